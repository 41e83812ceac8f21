"""One module per pipeline step (prepare, extract, train, evaluate), each composing the library for one unit of work.

Flows (`flows/`) and the CLI (`layerprobe ...`) both call these, so a Prefect task and a command line run do the
same thing and share their outputs. A step takes the config sections it needs, computes the fingerprint of its
output (`layerprobe.fingerprint`: code, params, inputs), reuses the output when its completion marker records that
fingerprint and its files vouch for their hashes, and otherwise computes it in a staging folder beside the output
and swaps it in whole (`layerprobe.files.begin_output` / `swap_in`): the old output stays usable until then. It
returns a small JSON-able summary (paths, content hashes, and `status`: "computed" or "reused" with the reason).

Steps live in separate modules on purpose: a step's fingerprint covers the code it imports, and so do the DVC deps
of its stage, so a change in training code never invalidates a feature cache.
"""
