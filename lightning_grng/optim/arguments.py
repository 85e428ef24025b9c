"""Constructor arguments: each described once, for every optimizer that takes it.

The optimizers keep explicit signatures (LightningCLI and IDEs read them); :func:`documented`
writes each class's ``Args:`` section from its signature and :data:`DESCRIPTIONS`, so
``help(lg.RING)`` and ``--optimizer.help grng.RING`` list every argument with one line of
plain text (no markup), and :func:`hyperparameters` hands the arguments on without listing
them a second time.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any, TypeVar

T = TypeVar("T", bound=type)

#: What each argument means. A class overrides an entry with its own ``ARGUMENTS`` dict.
DESCRIPTIONS: dict[str, str] = {
    "params": "parameters or parameter groups (each group may set lr, momentum, "
    "weight_decay, damping and rho).",
    "lr": "learning rate. In the default eigen mode it has Adam's units (typically 0.01-0.03; "
    "the update is invariant to the loss scale); in the kfac mode the KL-clip sets the step "
    "length (typically 0.01-0.3).",
    "momentum": "momentum in [0, 1): in the eigen mode an EMA (of the gradient, or of the "
    "preconditioned update with momentum_on='direction'), heavy ball m = mu*m + U on the "
    "preconditioned update in the kfac mode.",
    "weight_decay": "decoupled weight decay (w = w*(1 - lr*wd)), >= 0.",
    "damping": "Tikhonov damping lambda > 0 in the units of damping_mode. None: the route's "
    "default, 1e-4 in the eigen mode (relative to the mean second moment D) and 100 in the "
    "kfac mode (relative to the mean eigenvalue of A x G).",
    "damping_mode": "'relative' (default: gamma = lambda times each block's mean curvature, so "
    "lambda is scale-free) or 'absolute' (gamma = lambda).",
    "ema_decay": "decay of the Kronecker factors' moving averages, in [0, 1).",
    "curvature_every": "gather the curvature statistics every this many steps. None: 1 with "
    "gradient statistics, 5 with K-FAC statistics.",
    "inverse_every": "refresh the eigenbasis (eigen mode) or the inverses (kfac mode) every "
    "this many steps; blocks are staggered over the period. None: 10 with gradient "
    "statistics, 20 with K-FAC statistics.",
    "inverse": "how the kfac mode represents its inverse: 'eigh' (exact damping from "
    "eigendecompositions) or 'newton' (warm-started Newton-Schulz inverses, matmuls only). "
    "The eigen mode needs 'eigh'. None: 'eigh'.",
    "newton_iters": "Newton-Schulz iterations of a cold-started inverse (the newton route).",
    "kl_clip": "bound on the step's predicted KL change lr^2 * <U, g>; None disables it.",
    "fisher": "'empirical' (statistics from the training loss's backward) or 'mc' (labels "
    "sampled from the model; call optimizer.mc_fisher_backward(outputs); K-FAC statistics "
    "only).",
    "loss_reduction": "how the training loss reduces over samples, 'mean' or 'sum' (sets the "
    "scale of the output-gradient factor G).",
    "fallback": "update of parameters without a Kronecker block (norms, bare parameters): "
    "'adam' (default) or 'sgd' (the raw gradient through momentum and the KL-clip).",
    "fallback_lr": "the Adam fallback's learning rate as a multiple of the group's lr (it "
    "follows the same schedule). None: the route's default, 1 in the eigen mode, 0.1 in the "
    "kfac mode.",
    "preconditioner": "'eigen' (default: the eigenbasis of A and G, each direction scaled by "
    "a running second moment of the rotated gradient, docs/algorithms.md section 8) or 'kfac' "
    "(the paper's (A x G + gamma*I)^-1).",
    "beta2": "eigen mode: decay of the second moment D, in [0, 1).",
    "power": "eigen mode: the step is (D + gamma + C_GR)^-power in the eigenbasis, in (0, 1] "
    "(0.5: Adam's scaling; 1: the natural gradient's).",
    "curvature": "where the Kronecker factors come from: 'kfac' (the paper's statistics of "
    "layer inputs and output gradients, captured by hooks) or 'gradient' (Shampoo/SOAP "
    "statistics G G^T and G^T G of each weight's gradient: no hooks; eigen mode only). None: "
    "'gradient' in the eigen mode, 'kfac' in the kfac mode and with fisher='mc'.",
    "refresh": "how the eigen mode keeps its eigenbasis: 'eigh' (default: a full "
    "eigendecomposition of every due factor) or 'warm' (one orthogonal-iteration step "
    "Q = qr(F Q) from the previous basis, SOAP's warm start, batched over same-sized factors; "
    "a full eigh at a factor's first refresh, while gradient statistics may still be "
    "rank-deficient (fewer updates than the factor's width) and after the basis drifted: "
    "relative off-diagonal mass of Q^T F Q above 0.25). Eigen mode only.",
    "stagger_first": "a width: blocks that decompose a factor at least this wide start with "
    "a stand-in identity basis (the factors' diagonals as eigenvalues) and get their first "
    "decomposition on their staggered refresh slot, so no step decomposes every wide factor "
    "at once (1: every block; a width above every factor: off). eigh-based routes only. "
    "None: 512 in the eigen mode, off in the kfac mode.",
    "max_factor": "None (default) or a width: a Kronecker factor wider than this is kept as "
    "its diagonal (its eigenbasis the identity, like an embedding's input factor), so it is "
    "never decomposed. eigh-based routes only. None: 2048 in the eigen mode (an LM head's "
    "vocabulary side stays diagonal, as SOAP's max_precond_dim does), no cap in the kfac mode.",
    "split_conv": "None (default) or a width: with gradient statistics, a convolution whose "
    "weight columns (C_in*kh*kw) are wider than this keeps its input side as two factors, "
    "over channels (C_in) and kernel taps (kh*kw), per tensor dimension as Shampoo and SOAP "
    "do, instead of one dense factor. None: 512 with gradient statistics (off with K-FAC "
    "statistics, where setting it is an error).",
    "one_sided": "precondition each weight on one side only, the other side's factor kept as "
    "its diagonal (an identity eigenbasis, never decomposed or rotated): 'input' keeps the "
    "input side A (the weight's columns), 'narrower' keeps the narrower side (the input side "
    "on a tie), so a block's state is at most its two moments plus twice its weight "
    "(optimizer state <= 4x the parameters). Split convolutions and blocks with a "
    "side already diagonal are unchanged. eigh-based routes only. None (default): both sides.",
    "compile": "run the eigen mode's per-block arithmetic between the two rotations (moments, "
    "damped curvature, power) through torch.compile, fused into one or two loops (default "
    "False: eager). The first steps pay the compile (seconds to a minute); if compiling fails "
    "the optimizer warns once and stays eager. Eigen mode only.",
    "batch_blocks": "eigen mode: same-shaped blocks (a transformer's repeated layers) take "
    "their gradient statistics and rotations as one batched matmul and their elementwise "
    "stage as one pass, instead of a dozen small ops per block (same arithmetic). Off by "
    "default: on a CPU it measured no faster (benchmarks/results/step_cost/batching.md); it "
    "is meant for GPUs, where each small op is a kernel launch.",
    "lazy_rows": "update an embedding's rows lazily: the rows this step's gradient touches are "
    "rotated, absorbed into the moments and moved; the others keep their moments and weights "
    "(as LazyAdam and torch's SparseAdam), so the work is O(rows touched) instead of "
    "O(vocabulary). Eigen mode only. None: True in the eigen mode.",
    "momentum_on": "what momentum averages: 'direction' (the preconditioned update) or "
    "'gradient' (the gradient's first moment, then preconditioned, as Adam and SOAP do; "
    "eigen mode only). None: 'gradient' in the eigen mode, 'direction' in the kfac mode.",
    "rho": "gradient-regularization strength rho >= 0.",
    "gr_mode": "'double_backprop' (exact Hg; needs loss.backward(create_graph=True), "
    "lightning_grng.regularized_backward or GRNGStrategy) or 'finite_difference' (one extra "
    "forward/backward on the same batch; needs step(closure)).",
    "fd_eps": "finite-difference step length eps*|g| (> 0).",
    "gr_norm": "which norm the penalty takes: 'squared' (rho/2 |grad l|^2, the paper's: "
    "g + rho*H g) or 'unsquared' (rho |grad l|, Zhao et al. 2022: g + rho*H g/|g|, rho a "
    "length in parameter space like SAM's radius, the step invariant to the loss scale).",
}


def documented(cls: T) -> T:
    """Appends an ``Args:`` section for every argument of ``cls.__init__``, in signature order;
    a class's own ``ARGUMENTS`` dict overrides :data:`DESCRIPTIONS`. An argument without a
    description is an error, so none goes undocumented."""
    own: dict[str, str] = getattr(cls, "ARGUMENTS", {})
    lines = []
    for name in inspect.signature(cls.__init__).parameters:
        if name == "self":
            continue
        text = own.get(name, DESCRIPTIONS.get(name))
        if text is None:
            raise TypeError(f"{cls.__name__}.__init__ argument {name!r} has no description")
        lines.append(textwrap.fill(f"{name}: {text}", 92, subsequent_indent="    "))
    body = inspect.cleandoc(cls.__doc__ or "")
    cls.__doc__ = body + "\n\nArgs:\n" + textwrap.indent("\n".join(lines), "    ") + "\n"
    return cls


def hyperparameters(arguments: dict[str, Any]) -> dict[str, Any]:
    """A constructor's ``locals()`` as the keyword arguments it was called with."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}
