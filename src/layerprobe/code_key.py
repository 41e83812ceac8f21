"""The code part of a fingerprint: the sources that compute a step's numbers, and the libraries that decide them.

A step's code key hashes the code it can run: its import closure (every module of ours it imports, at any depth,
lazily imported ones too), each module normalised so that comments, docstrings and formatting do not count, and of
each module only what is reached (import-time statements, decorated definitions, the step's own functions, and any
definition these mention): an unused function appended to a shared module changes no key. Plus the release
versions of the libraries that decide numbers. Orchestration modules (flows, tracking, CLI, plots, locks, ...) are
never in a step's closure (`tests/test_fingerprint.py` checks it), so editing them reuses every cache.

Sources are read with `tokenize`, never with `ast`: CPython 3.11's AST constructor is not thread-safe (a parse in
one thread can fail with "AST constructor recursion depth mismatch" while another thread parses or compiles;
python/cpython#106905, fixed in 3.13), and steps run in Prefect's worker threads beside imports and other libraries'
parses. `tokenize` builds no AST objects, so computing a key can never crash a run.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from layerprobe.files import stable_hash

PACKAGES = ("layerprobe", "flows")  # our own top-level packages: everything else is a library
LIBRARIES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "pillow", "pyarrow", "safetensors")
# In every step's closure, but no part of its key: they decide what is stale, never a number, and a change in how
# they key (what a listing holds, which modules count) changes the keys themselves.
KEYING_MODULES = ("layerprobe.code_key", "layerprobe.file_hashes", "layerprobe.fingerprint")


@functools.cache
def code_fingerprint(module: str) -> str:
    """Hash of the code `module` can run (its import closure, normalised, unreached definitions and keying modules
    left out) and of the library releases.

    Cached per process: the process runs the code it imported, so a key computed once stays true for its life.
    """
    return stable_hash({"sources": reached_sources(module), "libraries": library_releases()})


def reached_sources(module: str) -> dict[str, str]:
    """{module: hash of its reached top-level blocks} over `module`'s import closure.

    Every statement that is not a `def` or `class` runs at import, so it counts, and so do decorated definitions
    (decorators run at import: registries), every definition of `module` itself (its entry points), and, until
    nothing more is found, any definition whose name some counted block mentions. A function that nothing mentions
    cannot change a number, so appending one (or editing it) leaves every key as it was. Names are matched as
    words, whatever the scope: a false match only keeps more.
    """
    modules = {name: path for name, path in closure_modules(module).items() if name not in KEYING_MODULES}
    blocks = {name: module_blocks(path) for name, path in modules.items()}
    kept = {name: [b.name is None or b.decorated or name == module for b in found] for name, found in blocks.items()}
    mentioned = {
        word for name, found in blocks.items() for b, k in zip(found, kept[name], strict=True) if k for word in b.names
    }
    grew = True
    while grew:
        grew = False
        for name, found in blocks.items():
            for index, block in enumerate(found):
                if not kept[name][index] and block.name in mentioned:
                    kept[name][index], grew = True, True
                    mentioned |= block.names
    return {
        name: stable_hash([list(b.tokens) for b, k in zip(found, kept[name], strict=True) if k])
        for name, found in blocks.items()
    }


@functools.cache
def full_code_hash() -> str:
    """Hash of every module of our packages (normalised): recorded in markers for provenance, never for reuse."""
    sources = {}
    for top in PACKAGES:
        base = _package_dir(top)
        for name, path in _modules_under(top, base) if base else ():
            sources[name] = normalised_source(path)
    return stable_hash(sources)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide numbers, as installed (`2.5.1+cu121`)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def library_releases() -> dict[str, str]:
    """The versions without their local label: a CUDA and a CPU build of one torch release compute the same
    numbers (the device is not part of any key either), so moving a study to a GPU box keeps its caches."""
    return {name: found.split("+")[0] for name, found in library_versions().items()}


def import_closure(module: str) -> list[Path]:
    """Source files of `module` and of every module of ours it imports, at any depth, parents' `__init__` included.

    Imports are read from the source, inside functions too, so lazily imported modules count; only modules of our
    own packages (`PACKAGES`) are followed.
    """
    return sorted(closure_modules(module).values())


def closure_modules(module: str) -> dict[str, Path]:
    """{module name: source file} of `module`'s import closure (see `import_closure`)."""
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        for candidate in [*_parents(name), name]:
            if candidate in seen:
                continue
            path = _source_file(candidate)
            if path is None:
                continue
            seen[candidate] = path
            text = path.read_text(encoding="utf-8")
            pending.extend(imported_modules(text, candidate, is_package=path.name == "__init__.py"))
    if module not in seen:
        raise ValueError(f"module {module!r} is not a module of {', '.join(PACKAGES)}")
    return dict(sorted(seen.items()))


# ------------------------------------------------------------------------------------------- reading sources


def normalised_source(path: Path) -> str:
    """Hash of the module's tokens without comments, docstrings, blank lines and line wrapping: editing any of
    those leaves it unchanged; changing code changes it."""
    return _normalised_source(path.read_text(encoding="utf-8"))


# Cached on the source text itself (reading is cheap, tokenising is not, and the steps share most modules): a file
# rewritten within one mtime tick is never mistaken for its earlier version.
@functools.lru_cache(maxsize=1024)
def _normalised_source(text: str) -> str:
    return stable_hash(normalised_tokens(text))


def normalised_tokens(text: str) -> list[str]:
    """The module's significant tokens, docstrings dropped, indentation reduced to its structure."""
    return [_STRUCTURE.get(kind, word) for line in _normalised_lines(text) for kind, word in line]


@dataclass(frozen=True)
class Block:
    """One top-level statement of a module: a `def` or `class` with its decorators (`name` set), or any other."""

    name: str | None
    decorated: bool
    tokens: tuple[str, ...]  # normalised, as `normalised_tokens`
    names: frozenset[str]  # every identifier it mentions


def module_blocks(path: Path) -> tuple[Block, ...]:
    """The module's top-level statements, in order."""
    return _module_blocks(path.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1024)
def _module_blocks(text: str) -> tuple[Block, ...]:
    groups: list[list[list[tuple[int, str]]]] = []  # top-level statements, each a list of logical lines
    depth, decorators = 0, []
    for line in _normalised_lines(text):
        depth += sum(kind == tokenize.INDENT for kind, _ in line) - sum(kind == tokenize.DEDENT for kind, _ in line)
        body = [word for kind, word in line if kind not in _STRUCTURE]
        if depth > 0 and groups:
            groups[-1].append(line)
        elif body[:1] == ["@"]:
            decorators.append(line)
        elif body:
            groups.append([*decorators, line])
            decorators = []
    blocks = []
    for group in groups:
        header = next(i for i, line in enumerate(group) if [w for k, w in line if k not in _STRUCTURE][:1] != ["@"])
        opening = [w for k, w in group[header] if k not in _STRUCTURE and w != "async"]
        name = opening[1] if opening[:1] in (["def"], ["class"]) else None
        blocks.append(
            Block(
                name=name,
                decorated=header > 0,
                tokens=tuple(_STRUCTURE.get(kind, word) for line in group for kind, word in line),
                names=frozenset(w for line in group for kind, w in line if kind == tokenize.NAME) - {name},
            )
        )
    return tuple(blocks)


def _normalised_lines(text: str) -> Iterator[list[tuple[int, str]]]:
    """The module's logical lines as (kind, text) tokens, docstrings dropped (their INDENT/DEDENT kept)."""
    expect_docstring = True  # a module, class or function body may open with one
    for line in _logical_lines(text):
        body = [token for token in line if token[0] not in _STRUCTURE]
        if expect_docstring and body and all(kind == tokenize.STRING for kind, _ in body):
            line = [token for token in line if token[0] in (tokenize.INDENT, tokenize.DEDENT)]
        yield line
        expect_docstring = _opens_body(body)


def imported_modules(text: str, name: str, *, is_package: bool) -> Iterator[str]:
    """Every module name an import statement of module `name` mentions (`from a import b` gives `a` and `a.b`: a
    name that is no module is skipped later)."""
    package = name if is_package else name.rpartition(".")[0]
    for line in _logical_lines(text):
        words = [text for kind, text in line if kind not in _STRUCTURE]
        for statement in _split(words, ";"):
            if statement[:1] == ["import"]:
                for alias in _split(statement[1:], ","):
                    yield "".join(alias[: alias.index("as")] if "as" in alias else alias)
            elif statement[:1] == ["from"] and "import" in statement:
                where = statement.index("import")
                dotted = "".join(statement[1:where])
                level = len(dotted) - len(dotted.lstrip("."))
                base = dotted[level:]
                if level:
                    anchor = package.split(".")[: len(package.split(".")) - (level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                yield base
                names = [word for word in statement[where + 1 :] if word not in "()"]
                yield from (f"{base}.{alias[0]}" for alias in _split(names, ",") if alias and alias[0] != "*")


_STRUCTURE = {
    tokenize.INDENT: "<indent>",
    tokenize.DEDENT: "<dedent>",
    tokenize.NEWLINE: "<newline>",
    tokenize.ENDMARKER: "<end>",
}
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python 3.12+ splits f-strings into several tokens
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def _logical_lines(text: str) -> Iterator[list[tuple[int, str]]]:
    """(kind, text) tokens per logical line, comments and non-logical line breaks dropped. An f-string is one STRING
    token of its exact source text on every Python version (3.12 tokenises its parts separately)."""
    lines = text.splitlines(keepends=True)
    line: list[tuple[int, str]] = []
    depth, start = 0, (0, 0)
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if _FSTRING_START is not None and token.type == _FSTRING_START:
            depth, start = depth + 1, token.start if depth == 0 else start
            continue
        if depth:
            if token.type == _FSTRING_END:
                depth -= 1
                if depth == 0:
                    line.append((tokenize.STRING, _source_between(lines, start, token.end)))
            continue
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING):
            continue
        line.append((token.type, token.string))
        if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            yield line
            line = []
    if line:
        yield line


def _source_between(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    (first, column), (last, end_column) = start, end
    if first == last:
        return lines[first - 1][column:end_column]
    return lines[first - 1][column:] + "".join(lines[first : last - 1]) + lines[last - 1][:end_column]


def _opens_body(body: list[tuple[int, str]]) -> bool:
    """Whether this logical line is a `def` or `class` header whose body starts on the next line."""
    words = [text for _, text in body]
    if words[:1] == ["async"]:
        words = words[1:]
    return bool(words) and words[0] in ("def", "class") and words[-1] == ":"


def _split(words: list[str], separator: str) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for word in words:
        if word == separator:
            parts.append([])
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


# ------------------------------------------------------------------------------------------- finding modules


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def _package_dir(top: str) -> Path | None:
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _source_file(name: str) -> Path | None:
    """The .py file of module `name` if it is one of ours (a module file or a package's __init__)."""
    top, *rest = name.split(".")
    if top not in PACKAGES:
        return None
    base = _package_dir(top)
    if base is None:
        return None
    stem = base.joinpath(*rest) if rest else base
    for path in (stem.with_suffix(".py") if rest else None, stem / "__init__.py"):
        if path is not None and path.is_file():
            return path
    return None


def _modules_under(top: str, base: Path) -> Iterable[tuple[str, Path]]:
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(base).with_suffix("").parts
        yield ".".join([top, *(p for p in parts if p != "__init__")]), path
