"""Learned optimizers (Optim4RL, L2L, Lin, STAR) and hand-designed ones, as optax transformations.

::

    opt = Optim4RL()                                    # architecture (frozen dataclass)
    phi = opt.init_meta(jax.random.key(0))              # meta-parameters φ, a pytree
    tx = opt.transform(phi, learning_rate=3e-3, grad_clip=1.0)   # optax.GradientTransformation
    save("opt.o4r", opt, phi, info={...}); opt, phi, info = load("opt.o4r")
    tx = make_optimizer("adam", learning_rate=3e-4, grad_clip=1.0)
    tx = make_optimizer("optim4rl:opt.o4r", learning_rate=3e-4)
"""

from optim4rl.optimizers.base import GRUState, LearnedOptimizer
from optim4rl.optimizers.files import load, save
from optim4rl.optimizers.gru_optimizers import (L2L, Lin, Optim4RL, Optim4RLState, l2l_features,
                                                sign_log_features)
from optim4rl.optimizers.make import learned_from_spec, make_optimizer, optimizer_source
from optim4rl.optimizers.registry import (LEARNED, hand_designed, list_optimizers,
                                          list_pretrained)
from optim4rl.optimizers.star import STAR, STARState

__all__ = [
    "LEARNED", "LearnedOptimizer", "Optim4RL", "L2L", "Lin", "STAR",
    "Optim4RLState", "GRUState", "STARState",
    "make_optimizer", "learned_from_spec", "optimizer_source", "hand_designed", "list_optimizers", "list_pretrained",
    "save", "load", "sign_log_features", "l2l_features",
]
