"""The module named by the ``genserve`` entry point: it only implements hooks.

Keep imports here light and side-effect free: genserve imports every installed plugin at
startup, in every tensor-parallel worker too, and may do so more than once.
"""

from genserve.hookspecs import hookimpl


@hookimpl
def genserve_register_architectures(register):
    from genserve_example_model.gptj import GPTJForCausalLM

    register("gptj", GPTJForCausalLM)  # keyed by the checkpoint's config.model_type
