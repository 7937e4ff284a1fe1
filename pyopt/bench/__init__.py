"""`pyopt bench`: kernel benchmarks against stock PyTorch, measured with the
machine's own bandwidth limits from the same process. Suites plug in through
``SUITES`` (name -> module with ``run(device, quick, ...)``)."""
from . import optim, quant, sparse

SUITES = {"optim": optim, "sparse": sparse, "quant": quant}
