"""The composed verbs, one home each: compare, distill and search take names, paths or modules, compose the
parts (io, quant, distillation, evaluate, runtime, report) and write their folders; prepare builds ahead of
time what first use would. `shrink.compare`, `shrink.distill` and `shrink.search` are the functions here."""
