"""General utilities the analysis, surgery and assembly layers share: hook registration
that always cleans up and restores a module's state (:mod:`.hooks`), and the distributed
context for data-parallel passes under torchrun (:mod:`.distributed`)."""
