"""The built-in proposers, registered through the same hook as a plugin's."""

from genserve.hookspecs import hookimpl
from genserve.spec_decode.draft_model import DraftModelProposer
from genserve.spec_decode.eagle import EagleProposer
from genserve.spec_decode.medusa import MedusaProposer
from genserve.spec_decode.ngram import NgramProposer


@hookimpl
def genserve_register_spec_proposers(register):
    for cls in (NgramProposer, DraftModelProposer, MedusaProposer, EagleProposer):
        register(cls.name, cls)
