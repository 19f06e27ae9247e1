"""The learned optimizers of optim4rl for PyTorch, reading the same ``.o4r`` files as JAX.

::

    import optim4rl.torch
    optimizer = optim4rl.torch.Optim4RL(model.parameters(), lr=3e-3, file="optim4rl:grid6")
    loss.backward(); optimizer.step(); optimizer.zero_grad()

:class:`Optim4RL`, :class:`L2L`, :class:`Lin` and :class:`STAR` are ``torch.optim.Optimizer``
subclasses giving the same updates as their JAX versions with the same meta-parameters
(Lan et al., "Learning to Optimize for Reinforcement Learning", arXiv 2302.01470). Needs the
``torch`` extra; running them imports neither JAX nor optax.
"""

try:
    import torch  # noqa: F401
except ImportError:
    raise ImportError('optim4rl.torch needs PyTorch, which is not installed: '
                      'pip install "optim4rl[torch]"') from None

from optim4rl.torch.files import O4RFile, pretrained_names, read
from optim4rl.torch.optimizers import L2L, STAR, LearnedOptimizer, Lin, Optim4RL, from_file

__all__ = ["Optim4RL", "L2L", "Lin", "STAR", "LearnedOptimizer", "from_file", "read", "O4RFile",
           "pretrained_names"]
