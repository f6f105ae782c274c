"""Adversarial attacks of the original ALP code: projected gradient descent and its variants.

Attack descriptions are the original strings:

* ``clean``: no attack, the input is returned unchanged.
* ``pgd_EPS_STEP_NITER``: untargeted PGD against the model's own *prediction* ``argmax(logits)``
  (not the true label, as in the original, so evaluation needs no labels).
* ``pgdll_EPS_STEP_NITER``: PGD targeted at the least-likely predicted class ``argmin(logits)``.
* ``pgdrnd_EPS_STEP_NITER``: PGD targeted at a uniformly random class.

EPS and STEP are integers within 1..255 (the original README's range, the 0..255 pixel scale)
and are rescaled to model units by ``(bounds[1] - bounds[0]) / 255``; with the bounds (-1, 1) of
the ALP datasets, 16 means 32/255. NITER is at least 1.

The PGD loop runs in-graph (a ``tf.while_loop`` of a few steps per iteration, so the model is
traced a fixed number of times whatever NITER is). Eagerly, keep the attack compiled for your
model: ``attack = make_attack("pgdll_16_2_10", model_fn, bounds)``, then ``attack(images)`` for
every batch; it traces once per input signature and frees the model when dropped.
``generate_adversarial_examples`` called eagerly also reuses one compiled function per model
(an equivalent fresh lambda included) and holds the model only weakly.

Give a registered model as ``model.inference`` rather than ``lambda x: model(x,
is_training=False)``: the attack then runs inside ``model.cast_weights()``, so a bfloat16 or
float16 model casts its float32 weights once per attack instead of at every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import threading
import types
import weakref
from typing import Callable, Optional, Union

import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError

ModelFn = Callable[[tf.Tensor], tf.Tensor]
Seed = Optional[Union[tf.Tensor, tuple, list]]

_METHODS = ("pgd", "pgdll", "pgdrnd")
_DESCRIPTION_RE = re.compile(r"^(pgd|pgdll|pgdrnd)_(\d+)_(\d+)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A parsed attack description; ``eps`` and ``step`` are on the 0..255 scale."""

    method: str  # 'clean', 'pgd', 'pgdll' or 'pgdrnd'
    eps: int = 0
    step: int = 0
    num_iter: int = 0

    @property
    def is_clean(self) -> bool:
        return self.method == "clean"


def parse_attack_description(attack_description: str) -> AttackSpec:
    """Parses ``clean`` or ``METHOD_EPS_STEP_NITER``.

    Raises:
      ConfigError: (a ValueError) naming the description when it is malformed, EPS or STEP is
        outside 1..255 or NITER is below 1.
    """
    description = (attack_description or "").strip()
    if description == "clean":
        return AttackSpec("clean")
    match = _DESCRIPTION_RE.match(description)
    if not match:
        raise ConfigError(
            f"invalid attack description {attack_description!r}: expected 'clean' or "
            f"'METHOD_EPS_STEP_NITER' with METHOD in {', '.join(_METHODS)} and integer "
            "EPS, STEP, NITER (e.g. 'pgdll_16_2_10')"
        )
    method, eps, step, num_iter = match.groups()
    spec = AttackSpec(method, int(eps), int(step), int(num_iter))
    # The original README's range: pixel values on the 0..255 scale, at least one level.
    for name, value in (("EPS", spec.eps), ("STEP", spec.step)):
        if not 1 <= value <= 255:
            raise ConfigError(f"invalid attack description {attack_description!r}: {name} must "
                              f"be within 1..255 (the 0..255 pixel scale), not {value}")
    if spec.num_iter < 1:
        raise ConfigError(f"invalid attack description {attack_description!r}: NITER must be >= 1")
    return spec


def _split_seed(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    pair = tf.random.experimental.stateless_split(seed, num=2)
    return pair[0], pair[1]


def _as_seed(seed: Seed) -> Optional[tf.Tensor]:
    """None, or the stateless seed as an int64 tensor."""
    return None if seed is None else tf.cast(tf.convert_to_tensor(seed), tf.int64)


def _uniform(shape, minval, maxval, dtype, seed: Optional[tf.Tensor]) -> tf.Tensor:
    if seed is None:
        return tf.random.uniform(shape, minval, maxval, dtype=dtype)
    return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval, dtype=dtype)


def _weights_cast_once(model_fn: ModelFn) -> contextlib.AbstractContextManager:
    """``model.cast_weights()`` when ``model_fn`` is ``model.inference``, else a null context.

    ``model_fn`` is otherwise opaque here; a bound method of an object with ``cast_weights``
    is the one form recognised, because only the model can make its layers share one
    low-precision copy of each weight across the label pass and the PGD steps.
    """
    cast_weights = getattr(getattr(model_fn, "__self__", None), "cast_weights", None)
    return cast_weights() if callable(cast_weights) else contextlib.nullcontext()


# PGD steps per tf.while_loop iteration (see pgd).
STEPS_PER_ITERATION = 5


def _repeat(step: Callable[[tf.Tensor], tf.Tensor], steps: int, count: int,
            x: tf.Tensor) -> tf.Tensor:
    """``x`` after ``count`` in-graph loop iterations of ``steps`` calls of ``step``."""

    def body(i, x):
        for _ in range(steps):
            x = step(x)
        return i + 1, x

    _, x = tf.while_loop(lambda i, _: i < count, body, (tf.constant(0), x))
    return x


def pgd(
    x: tf.Tensor,
    bounds: tuple[float, float],
    model_fn: ModelFn,
    eps: float,
    step_size: float,
    num_iter: int,
    labels: tf.Tensor,
    targeted: bool = False,
    seed: Seed = None,
) -> tf.Tensor:
    """L-infinity projected gradient descent (Madry et al.) as the original ALP code runs it.

    Starts at ``x + uniform(-eps, eps)`` clipped to the box ``[max(x-eps, lo), min(x+eps, hi)]``;
    each of ``num_iter`` steps moves by ``step_size * sign(grad)`` of the summed softmax
    cross-entropy of ``labels`` (up when untargeted, down when targeted) and clips to the box.

    Args:
      x: images [N, H, W, C] within ``bounds``.
      bounds: (lo, hi) range of valid inputs.
      model_fn: maps images to logits [N, K]; call it in inference mode (BN moving statistics).
      eps: radius of the L-infinity box, in model units.
      step_size: size of one step, in model units.
      num_iter: number of gradient steps (a Python int).
      labels: int class indices [N]: the label to move away from, or the target.
      targeted: whether to descend (target) instead of ascend the loss.
      seed: None to use the global RNG, or a shape-[2] integer seed for stateless random
        numbers (the same seed gives the same output).

    Returns:
      Adversarial images, same shape and dtype as ``x``; no gradient flows through them.
    """
    if tf.executing_eagerly():
        settings = ((float(bounds[0]), float(bounds[1])), float(eps), float(step_size),
                    int(num_iter), bool(targeted))
        compiled = compiled_for(
            model_fn, ("pgd", settings),
            lambda model_fn, x, labels, seed: pgd(x, settings[0], model_fn, *settings[1:4],
                                                  labels, settings[4], seed),
        )
        return compiled(x, labels, _as_seed(seed))
    # In a graph (the caller's, or the cached function above).
    seed = _as_seed(seed)
    lo, hi = float(bounds[0]), float(bounds[1])
    eps, step_size, num_iter = float(eps), float(step_size), int(num_iter)
    x = tf.convert_to_tensor(x)
    box_lo = tf.maximum(x - eps, lo)
    box_hi = tf.minimum(x + eps, hi)
    noise = _uniform(tf.shape(x), -eps, eps, x.dtype, seed)
    x_adv = tf.clip_by_value(x + noise, box_lo, box_hi)
    labels = tf.cast(labels, tf.int32)
    # Descending the target's loss is ascending its negative.
    direction = -1.0 if targeted else 1.0

    def pgd_step(x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            logits = model_fn(x_adv)
            one_hot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
            # The original differentiates the SUM over the batch: each example's gradient is
            # then independent of the batch size.
            loss = tf.reduce_sum(
                tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits)
            )
        grad = tape.gradient(loss, x_adv)
        x_next = x_adv + direction * step_size * tf.sign(grad)
        return tf.clip_by_value(x_next, box_lo, box_hi)

    # Each iteration of a tf.while_loop costs a fixed overhead that, on resnet_v2_50 at 64x64
    # on a 2-core CPU, added 4-5% to ten gradient steps; running STEPS_PER_ITERATION steps per
    # iteration removes it (bench/attack.py) while the body is still traced a fixed number of
    # times whatever NUM_ITER is. The remainder runs in a one-step loop.
    full, rest = divmod(num_iter, STEPS_PER_ITERATION)
    # The weights are cast before the loops (casting them in every step took 6.5% of a bfloat16
    # input-gradient pass); inside _attack_graph's block this reuses the label pass's casts.
    with _weights_cast_once(model_fn):
        for steps, count in ((STEPS_PER_ITERATION, full), (1, rest)):
            if count:
                x_adv = _repeat(pgd_step, steps, count, x_adv)
    return tf.stop_gradient(x_adv)


# Eager calls reuse one compiled function per (model, key): the attacks here, and other
# per-model steps such as llr.spatial's grid step. The cached function must not hold the model
# (a weak-keyed cache whose values close over their key is never freed), so it gets the
# model_fn of the current call through _CURRENT and the cache holds only weak references;
# each entry is evicted when one of the objects it was keyed on dies.
_COMPILED: dict[tuple, _CompiledStep] = {}
_CURRENT = threading.local()
_VALUE_TYPES = (bool, int, float, complex, str, bytes, type(None))


def _identity(model_fn: Callable) -> tuple:
    """The objects that decide what ``model_fn`` computes.

    A fresh ``lambda x: model(x, is_training=False)`` per call (the natural way to fix an
    argument) is a new object each time but computes the same thing as the last one: same code,
    same closure cells, defaults and globals it names. Keying on those lets it reuse the
    compiled function instead of tracing the model again. As with any tf.function, attributes
    reached through those objects are read when tracing (rebinding ``self.model`` on a captured
    ``self`` is not seen). A bound method is its function and its instance; anything else, and a
    function with nested functions, is itself.
    """
    if inspect.ismethod(model_fn):
        return (model_fn.__func__, model_fn.__self__)
    if not isinstance(model_fn, types.FunctionType):
        return (model_fn,)
    code = model_fn.__code__
    if any(isinstance(const, types.CodeType) for const in code.co_consts):
        return (model_fn,)
    try:
        cells = tuple(cell.cell_contents for cell in model_fn.__closure__ or ())
    except ValueError:  # an empty cell (a variable not yet assigned)
        return (model_fn,)
    names = model_fn.__globals__
    used_globals = tuple(names[name] for name in code.co_names if name in names)
    keywords = sorted((model_fn.__kwdefaults__ or {}).items())
    return (code, *cells, *used_globals, *(model_fn.__defaults__ or ()),
            *(item for pair in keywords for item in pair))


def _cache_key(parts: tuple) -> Optional[tuple]:
    """Identities of weak-referenceable parts and values of immutable scalars; else None."""
    key = []
    for part in parts:
        if isinstance(part, _VALUE_TYPES) or (
                isinstance(part, tuple) and all(isinstance(p, _VALUE_TYPES) for p in part)):
            key.append(("value", type(part), part))
        else:
            try:
                weakref.ref(part)
            except TypeError:
                return None
            key.append(("id", id(part)))
    return tuple(key)


class _CompiledStep:
    """A cache entry: ``graph_fn(model_fn, *args)`` compiled once, called with any equivalent
    ``model_fn``, holding the objects it was keyed on only weakly."""

    def __init__(self, graph_fn: Callable, parts: tuple, key: tuple):
        self.function = tf.function(lambda *args: graph_fn(_CURRENT.model_fn, *args),
                                    reduce_retracing=True)
        # Evicts this entry when any weakly keyed object dies (before its id can be reused).
        self.refs = [weakref.ref(part, lambda _: _COMPILED.pop(key, None))
                     for part in parts if not isinstance(part, (*_VALUE_TYPES, tuple))]

    def __call__(self, model_fn: Callable, *args):
        previous = getattr(_CURRENT, "model_fn", None)
        _CURRENT.model_fn = model_fn  # read only while tracing
        try:
            return self.function(*args)
        finally:
            _CURRENT.model_fn = previous


def compiled_for(model_fn: Callable, key: tuple, graph_fn: Callable) -> Callable:
    """``graph_fn(model_fn, *args)`` as a tf.function cached for ``model_fn`` under ``key``.

    Returns ``f(*args)``. ``graph_fn`` must reach the model only through its first argument and
    be the same computation for the same ``key``: the cache holds neither ``model_fn`` nor what
    it uses, so dropping the model frees its compiled functions. A new but equivalent
    ``model_fn`` (a fresh lambda over the same model) reuses the same trace. One function serves
    seeded and unseeded calls: tf.function traces ``seed=None`` apart from a seed tensor, and
    each once per input signature.
    """
    parts = _identity(model_fn)
    ids = _cache_key(parts)
    if ids is None and len(parts) > 1:  # e.g. a lambda over a list: key on the lambda itself
        parts = (model_fn,)
        ids = _cache_key(parts)
    if ids is None:  # not weak-referenceable: compile without caching
        step = _CompiledStep(graph_fn, (), ())
        return functools.partial(step, model_fn)
    full_key = (ids, key)
    step = _COMPILED.get(full_key)
    if step is None:
        step = _COMPILED[full_key] = _CompiledStep(graph_fn, parts, full_key)
    return functools.partial(step, model_fn)


def _attack_graph(
    x: tf.Tensor,
    bounds: tuple[float, float],
    model_fn: ModelFn,
    spec: AttackSpec,
    seed: Optional[tf.Tensor],
) -> tf.Tensor:
    """Labels from the model's prediction (or a random target), then PGD; traced in a graph."""
    lo, hi = bounds
    scale = (hi - lo) / 255.0
    start_seed = target_seed = None
    if seed is not None:
        start_seed, target_seed = _split_seed(seed)
    with _weights_cast_once(model_fn):  # one cast per weight for the labels and all steps
        logits = model_fn(x)
        if spec.method == "pgd":
            labels = tf.argmax(logits, axis=-1)
        elif spec.method == "pgdll":
            labels = tf.argmin(logits, axis=-1)
        else:
            num_classes = tf.shape(logits, out_type=tf.int64)[-1]
            batch = tf.shape(logits, out_type=tf.int64)[:1]
            if target_seed is None:
                labels = tf.random.uniform(batch, 0, num_classes, dtype=tf.int64)
            else:
                labels = tf.random.stateless_uniform(
                    batch, seed=target_seed, minval=0, maxval=num_classes, dtype=tf.int64
                )
        return pgd(
            x, (lo, hi), model_fn, spec.eps * scale, spec.step * scale, spec.num_iter,
            tf.stop_gradient(labels), spec.method != "pgd", start_seed,
        )


def generate_adversarial_examples(
    x: tf.Tensor,
    bounds: tuple[float, float],
    model_fn: ModelFn,
    attack_description: str,
    seed: Seed = None,
) -> tf.Tensor:
    """Generates adversarial examples as described by an original attack string.

    Inside a ``tf.function`` the attack is traced into the caller's graph. Called eagerly, it
    runs a tf.function cached per (model, description, bounds) that traces once per input
    signature, so repeated eager calls with the same model and shapes never retrace, even
    through a fresh ``lambda x: model(x, is_training=False)`` each time; the cache holds the
    model weakly. For a loop of eager calls, :func:`make_attack` says the same without a cache.

    Args:
      x: clean images [N, H, W, C] within ``bounds``.
      bounds: (lo, hi) range of the images, e.g. (-1, 1).
      model_fn: maps images to logits [N, K], in inference mode.
      attack_description: 'clean', 'pgd_EPS_STEP_NITER', 'pgdll_...' or 'pgdrnd_...'.
      seed: None, or a shape-[2] integer seed making the random start and the random target
        of 'pgdrnd' reproducible.

    Returns:
      The adversarial images (``x`` itself for 'clean').

    Raises:
      ConfigError: (a ValueError) when the description is malformed.
    """
    spec = parse_attack_description(attack_description)
    if spec.is_clean:
        return x
    bounds = (float(bounds[0]), float(bounds[1]))
    seed = _as_seed(seed)
    if not tf.executing_eagerly():
        return _attack_graph(x, bounds, model_fn, spec, seed)
    # Compiling the label pass with the loop matters: run eagerly, a ResNet forward is
    # hundreds of separately dispatched ops.
    compiled = compiled_for(
        model_fn, ("attack", spec, bounds),
        lambda model_fn, x, seed: _attack_graph(x, bounds, model_fn, spec, seed),
    )
    return compiled(x, seed)


class Attack:
    """An attack compiled for one model: make it once, keep it, call it for every batch.

    ``attack(x, seed=None)`` returns the adversarial examples of ``x``, exactly as
    ``generate_adversarial_examples(x, bounds, model_fn, attack_description, seed)``. Called
    eagerly it runs its own tf.function, traced once per input signature; inside a
    ``tf.function`` it is traced into the caller's graph. It holds ``model_fn`` (and so the
    model) for as long as it is kept, and nothing else does.
    """

    def __init__(self, attack_description: str, model_fn: ModelFn,
                 bounds: tuple[float, float]):
        self.spec = parse_attack_description(attack_description)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.model_fn = model_fn
        spec, bounds = self.spec, self.bounds
        self._compiled = tf.function(
            lambda x, seed: _attack_graph(x, bounds, model_fn, spec, seed),
            reduce_retracing=True)

    def __call__(self, x: tf.Tensor, seed: Seed = None) -> tf.Tensor:
        """The adversarial examples of ``x`` (``x`` itself for 'clean'); see ``seed`` above."""
        if self.spec.is_clean:
            return x
        seed = _as_seed(seed)
        if not tf.executing_eagerly():
            return _attack_graph(x, self.bounds, self.model_fn, self.spec, seed)
        return self._compiled(x, seed)


def make_attack(attack_description: str, model_fn: ModelFn,
                bounds: tuple[float, float]) -> Attack:
    """The :class:`Attack` ``attack_description`` against ``model_fn`` for images in ``bounds``.

    Args:
      attack_description: 'clean', 'pgd_EPS_STEP_NITER', 'pgdll_...' or 'pgdrnd_...'.
      model_fn: maps images to logits [N, K], in inference mode.
      bounds: (lo, hi) range of the images, e.g. (-1, 1).

    Raises:
      ConfigError: (a ValueError) when the description is malformed.
    """
    return Attack(attack_description, model_fn, bounds)
