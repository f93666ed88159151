"""The documentation of every public kernel, once, for both backends.

The compiled modules and their NumPy twin take each public function's ``__doc__`` from here
(:func:`document`), so ``help(edgefl.kernels.clip_l2_)`` reads the same whichever backend runs.
(The compiled ``SGDState`` is a ``cdef class``, whose docstring cannot be assigned: it carries a
short one, and the twin's class this full text.)
"""

DOCS = {}

# -- clip -------------------------------------------------------------------------------------------

def _clip_doc(norm: str, notes: str) -> str:
    """The shared text of the in-place clipping kernels, for the ``norm`` they bound."""
    return f"""Scale ``x`` in place so that its {norm} norm is at most ``max_norm``.

Parameters
----------
x : numpy.ndarray
    float32, C-contiguous, writeable, any shape (the norm is over all elements).
max_norm : float
    The bound, finite and > 0.

Returns
-------
float
    The {norm} norm of ``x`` before clipping, accumulated in double.

Raises
------
TypeError
    ``x`` is not a float32 ndarray, or ``max_norm`` is not a number.
ValueError
    ``x`` is non-contiguous or read-only, contains NaN or Inf (``x`` is left unchanged), or
    ``max_norm`` is not finite and positive.

Notes
-----
{notes}
"""


DOCS["clip_l2_"] = _clip_doc(
    "L2", "L2 clipping bounds the L2 sensitivity: pair it with Gaussian noise. Laplace noise "
          "needs\n:func:`clip_l1_`.")

DOCS["clip_l1_"] = _clip_doc(
    "L1", "After clipping to C, adding or removing one update moves a sum by at most C in L1 "
          "norm\n(replacing one: 2C); Laplace noise is calibrated to that L1 sensitivity, never "
          "to an L2 bound.")

# -- noise ------------------------------------------------------------------------------------------

DOCS["laplace_"] = """Add i.i.d. Laplace(0, ``scale``) noise to ``x`` in place.

Parameters
----------
x : numpy.ndarray
    float32, C-contiguous, writeable, any shape.
scale : float
    The Laplace scale b (noise standard deviation ``sqrt(2) * b``); finite and > 0 in float32.
    For epsilon-DP after :func:`clip_l1_` with bound C, ``b = C / epsilon``.
rng : numpy.random.Generator
    Source of randomness; the same seed gives the same noise on both backends.

Raises
------
TypeError
    ``x`` is not a float32 ndarray, ``scale`` is not a number, or ``rng`` is not a Generator.
ValueError
    ``x`` is non-contiguous or read-only, or ``scale`` is not finite and positive.

Notes
-----
Draws ``ceil(n / 32)`` raw values for the signs, then n float32 exponentials (see the module
docstring for the exact order).
"""

DOCS["gaussian_"] = """Add i.i.d. N(0, ``sigma**2``) noise to ``x`` in place.

Parameters
----------
x : numpy.ndarray
    float32, C-contiguous, writeable, any shape.
sigma : float
    The standard deviation; finite and > 0 in float32. Calibrate it to the L2 bound of
    :func:`clip_l2_`.
rng : numpy.random.Generator
    Source of randomness; the same seed gives the same noise on both backends.

Raises
------
TypeError
    ``x`` is not a float32 ndarray, ``sigma`` is not a number, or ``rng`` is not a Generator.
ValueError
    ``x`` is non-contiguous or read-only, or ``sigma`` is not finite and positive.

Notes
-----
Draws n float32 normals from NumPy's ziggurat (``standard_normal(n, dtype=np.float32)``).
"""

# -- topk -------------------------------------------------------------------------------------------

DOCS["topk"] = """The k entries of ``x`` with the largest magnitude.

Parameters
----------
x : numpy.ndarray
    float32, C-contiguous, any shape (indices are into ``x.reshape(-1)``); may be read-only.
k : int
    How many entries to select, ``0 <= k <= x.size``.

Returns
-------
idx : numpy.ndarray
    uint32, shape (k,), sorted ascending. Among equal magnitudes the lower index is chosen;
    ``-0.0`` has magnitude 0.
vals : numpy.ndarray
    float32, shape (k,), ``x.reshape(-1)[idx]`` (signs kept).

Raises
------
TypeError
    ``x`` is not a float32 ndarray, or ``k`` is not an integer.
ValueError
    ``x`` is not C-contiguous, ``k`` is out of range, or ``x`` holds NaN or Inf.

Notes
-----
Top-k of a clean update leaks which coordinates the local data moved. Under differential
privacy, select only after noise has been added (post-processing), or use :func:`randomk`.
Runs without the GIL: one pass over ``x`` for k <= x.size / 20 on large arrays, two
otherwise (see the module docstring). The work buffers hold a little more than k indices for
real-valued data, up to ``2 * x.size`` 32-bit words when most magnitudes are equal (an
all-zero update, say).
"""

DOCS["topk_ef_"] = """Top-k with error feedback: accumulate, select, emit, and keep the rest for the next round.

``residual += update``; the k entries of the new residual with the largest magnitude are
returned, and zeroed in ``residual``, so whatever is not sent now is carried to the next
update instead of being lost (error feedback, Seide et al. 2014; Stich et al. 2018).

Parameters
----------
residual : numpy.ndarray
    float32, C-contiguous, writeable; updated in place.
update : numpy.ndarray
    float32, C-contiguous, same shape as ``residual``, not sharing memory with it.
k : int
    How many entries to emit, ``0 <= k <= residual.size``.

Returns
-------
idx : numpy.ndarray
    uint32, shape (k,), sorted ascending; ties in magnitude go to the lower index.
vals : numpy.ndarray
    float32, shape (k,), the accumulated residual at ``idx`` before it was zeroed.

Raises
------
TypeError
    Wrong array types or dtypes, or ``k`` not an integer.
ValueError
    Non-contiguous or read-only ``residual``, mismatched shapes, overlapping arrays, ``k`` out
    of range, or ``residual + update`` not finite anywhere. On any error ``residual`` is left
    unchanged.

Notes
-----
Runs without the GIL. The first pass reads ``residual + update`` without storing it (so an
error changes nothing); the second stores it while collecting the candidates.
"""

DOCS["threshold_select"] = """Every entry of ``x`` whose magnitude exceeds ``tau``: send only the coordinates that moved.

Parameters
----------
x : numpy.ndarray
    float32, C-contiguous, any shape (indices are into ``x.reshape(-1)``); may be read-only.
tau : float
    Finite, >= 0. Compared exactly, in double precision: ``abs(x) > tau``.

Returns
-------
idx : numpy.ndarray
    uint32, sorted ascending.
vals : numpy.ndarray
    float32, ``x.reshape(-1)[idx]``.

Raises
------
TypeError
    ``x`` is not a float32 ndarray, or ``tau`` is not a real number.
ValueError
    ``x`` is not C-contiguous, ``tau`` is negative or not finite, or ``x`` holds NaN or Inf.

Notes
-----
Two passes without the GIL: one counts (and checks finiteness), one collects into outputs of
exactly that size, allocated in between.
"""

DOCS["randomk"] = """k distinct coordinates out of n, sorted: the same on every device for the same seed.

Random-k picks coordinates independently of the data, so sending them leaks nothing about
it; the server announces ``seed`` and every device selects the same coordinates.

Parameters
----------
n : int
    Number of coordinates, ``0 <= n <= 2**32``.
k : int
    How many to pick, ``0 <= k <= n``.
seed : int
    A uint64, ``0 <= seed < 2**64``.

Returns
-------
numpy.ndarray
    uint32, shape (k,), distinct, sorted ascending.

Raises
------
TypeError
    An argument is not an integer.
ValueError
    An argument is out of range.

Notes
-----
The algorithm, fixed so that a C device (or any language) reproduces it exactly; all
arithmetic is on unsigned 64-bit integers, wrapping modulo 2**64:

1. Generator: SplitMix64 with ``state = seed``. Each draw does
   ``state += 0x9E3779B97F4A7C15; z = state;
   z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
   return z ^ (z >> 31)``.
2. Uniform integer in ``[0, m)`` without bias: draw ``z``; while ``z < 2**64 mod m`` (in C:
   ``(0 - m) % m``), draw again; return ``z % m``.
3. Floyd's sampling (Bentley, CACM 1987): start with an empty set S; for
   ``j = n - k, ..., n - 1``: ``t = uniform(j + 1)``; if t is in S insert j, else insert t.
4. Return the elements of S in ascending order.

Every k-subset is equally likely. Not a cryptographic generator: the seed is public anyway.
Runs without the GIL in O(k) draws plus a bitmap of n bits.
"""

# -- codec ------------------------------------------------------------------------------------------

DOCS["encode_indices"] = """Encode sorted indices as gap-1 LEB128 varints.

Parameters
----------
idx : numpy.ndarray
    uint32, 1-D, C-contiguous, sorted strictly ascending, every index < n.
n : int
    The dense length, 0 <= n <= 2**32.

Returns
-------
bytes
    The encoding (between k and 5k bytes), see the module docstring.

Raises
------
TypeError
    ``idx`` is not a uint32 ndarray or ``n`` is not an integer.
ValueError
    ``idx`` is not 1-D and contiguous, not strictly ascending, or has an index >= n.
"""

DOCS["decode_indices"] = """Decode the output of :func:`encode_indices`, checking it against the header's n and k.

Parameters
----------
buf : bytes-like
    The encoded indices, nothing before or after them.
n : int
    The dense length from the message header, 0 <= n <= 2**32.
k : int
    The number of indices from the message header, 0 <= k <= n.

Returns
-------
numpy.ndarray
    k uint32 indices, sorted strictly ascending, all < n.

Raises
------
TypeError
    ``buf`` is not bytes-like, or ``n`` or ``k`` is not an integer.
ValueError
    ``n`` or ``k`` is out of range, or the buffer is truncated, has trailing bytes, an
    over-long, over-large or non-canonical varint, or decodes to an index >= n.
"""

DOCS["encode_indices_rice"] = """Encode sorted indices as Golomb-Rice coded gaps.

Parameters
----------
idx : numpy.ndarray
    uint32, 1-D, C-contiguous, sorted strictly ascending, every index < n.
n : int
    The dense length, 0 <= n <= 2**32.

Returns
-------
bytes
    The Rice parameter byte, then the coded gaps (see the module docstring).

Raises
------
TypeError
    ``idx`` is not a uint32 ndarray or ``n`` is not an integer.
ValueError
    ``idx`` is not 1-D and contiguous, not strictly ascending, or has an index >= n.
"""

DOCS["decode_indices_rice"] = """Decode the output of :func:`encode_indices_rice`, checking it against the header.

Parameters
----------
buf : bytes-like
    The Rice parameter byte and the coded gaps, nothing after them.
n : int
    The dense length from the message header, 0 <= n <= 2**32.
k : int
    The number of indices from the message header, 0 <= k <= n.

Returns
-------
numpy.ndarray
    k uint32 indices, sorted strictly ascending, all < n.

Raises
------
TypeError
    ``buf`` is not bytes-like, or ``n`` or ``k`` is not an integer.
ValueError
    ``n`` or ``k`` is out of range, or the buffer is empty or truncated, has a Rice parameter
    above 31, trailing bytes or nonzero padding, or decodes to an index >= n.
"""

DOCS["encode_indices_bitmap"] = """Encode sorted indices as an n-bit bitmap (least significant bit first).

Parameters
----------
idx : numpy.ndarray
    uint32, 1-D, C-contiguous, sorted strictly ascending, every index < n.
n : int
    The dense length, 0 <= n <= 2**32.

Returns
-------
bytes
    ``ceil(n / 8)`` bytes; bit i % 8 of byte i // 8 is set when i is in ``idx``.

Raises
------
TypeError
    ``idx`` is not a uint32 ndarray or ``n`` is not an integer.
ValueError
    ``idx`` is not 1-D and contiguous, not strictly ascending, or has an index >= n.
"""

DOCS["decode_indices_bitmap"] = """Decode the output of :func:`encode_indices_bitmap`, checking it against the header.

Parameters
----------
buf : bytes-like
    Exactly ``ceil(n / 8)`` bytes.
n : int
    The dense length from the message header, 0 <= n <= 2**32.
k : int
    The number of indices from the message header, 0 <= k <= n.

Returns
-------
numpy.ndarray
    k uint32 indices, sorted strictly ascending, all < n.

Raises
------
TypeError
    ``buf`` is not bytes-like, or ``n`` or ``k`` is not an integer.
ValueError
    ``n`` or ``k`` is out of range, the length is not ``ceil(n / 8)``, a padding bit (an index
    >= n) is set, or the number of set bits is not k.
"""

DOCS["quantize"] = """Quantize float32 values for the wire.

Parameters
----------
vals : numpy.ndarray
    float32, 1-D, C-contiguous, all finite.
kind : {"f32", "f16", "int8", "ternary"}
    The encoding; see the module docstring for each rule.

Returns
-------
data : bytes
    The encoded values, little-endian.
scale : float
    1.0 for "f32" and "f16"; the float32 step for "int8"; the float32 magnitude for "ternary".

Raises
------
TypeError
    ``vals`` is not a float32 ndarray.
ValueError
    ``vals`` is not 1-D and contiguous, holds NaN or Inf, ``kind`` is unknown, or (for "f16")
    a value is beyond half precision's range.
"""

DOCS["dequantize"] = """Decode the output of :func:`quantize`.

Parameters
----------
buf : bytes-like
    Exactly the bytes ``quantize`` produced for k values of this kind.
kind : {"f32", "f16", "int8", "ternary"}
    The encoding.
k : int
    The number of values (from the message header), >= 0.
scale : float
    The scale ``quantize`` returned: 1.0 for "f32" and "f16", finite and >= 0 otherwise.

Returns
-------
numpy.ndarray
    k float32 values.

Raises
------
TypeError
    ``buf`` is not bytes-like, ``k`` is not an integer or ``scale`` not a number.
ValueError
    ``kind`` is unknown, the length does not match kind and k, ``scale`` is invalid, or the
    buffer holds NaN/Inf, the int8 code -128, the ternary code 10 or nonzero padding.
"""

# -- sgd --------------------------------------------------------------------------------------------

DOCS["softmax_sgd_step_"] = """One minibatch SGD step of softmax regression, in place.

Parameters
----------
W : ndarray of float32, shape (d, c), C-contiguous, writeable
    Weights, updated in place.
b : ndarray of float32, shape (c,), writeable
    Biases, updated in place.
X : ndarray of float32, shape (m, d), C-contiguous
    The minibatch, m >= 1 rows.
y : ndarray of integers, shape (m,)
    Class labels in ``[0, c)``.
lr : float
    Learning rate, finite and >= 0 (0 computes the loss and changes nothing).
momentum : float, optional
    Classical momentum in ``[0, 1)``; > 0 needs ``state``.
weight_decay : float, optional
    L2 penalty coefficient (>= 0) on ``W``; biases are not decayed.
mu : float, optional
    FedProx proximal coefficient (>= 0) pulling ``(W, b)`` towards ``(W_ref, b_ref)``, which
    are required when ``mu > 0`` and ignored when ``mu == 0``.
W_ref, b_ref : ndarray of float32, optional
    The reference (global) model, shaped like ``W`` and ``b``.
state : SGDState, optional
    Built with ``SGDState((d, c), max_batch)``: holds the velocity and the scratch memory,
    so repeated steps allocate nothing. Without it each call allocates its scratch.

Returns
-------
float
    The mean cross-entropy of the batch *before* the step (accumulated in double).

Raises
------
TypeError, ValueError
    For a bad argument, naming it; nothing is changed.
TrainingDiverged
    When the loss of the batch is not finite (divergence, or inf/nan in ``X`` or the
    weights): the step is refused and the weights and velocity are left unchanged. It is a
    ``FloatingPointError`` and a ``ValueError``.
"""

DOCS["mlp_sgd_step_"] = """One minibatch SGD step of a ReLU MLP with a softmax cross-entropy head, in place.

Parameters
----------
layers : list of (W, b)
    ``W`` float32 of shape ``(d_in, d_out)``, ``b`` of shape ``(d_out,)``, consecutive
    layers chaining; ReLU between layers, none after the last. Updated in place.
X : ndarray of float32, shape (m, d)
    The minibatch, ``d`` = rows of the first ``W``.
y : ndarray of integers, shape (m,)
    Class labels in ``[0, c)``, ``c`` = columns of the last ``W``.
lr, momentum, weight_decay, mu : float
    As in :func:`softmax_sgd_step_`; weight decay applies to every ``W``, not to biases.
ref : list of (W, b), optional
    The reference (global) model for the FedProx term, shaped like ``layers``; required
    when ``mu > 0``, ignored when ``mu == 0``.
state : SGDState, optional
    Built with ``SGDState(sizes, max_batch)`` where ``sizes = (d, d_1, ..., c)``.

Returns
-------
float
    The mean cross-entropy of the batch before the step.

Raises
------
TypeError, ValueError, TrainingDiverged
    As in :func:`softmax_sgd_step_`.
"""

DOCS["mlp_sgd_epochs_"] = """Whole epochs of minibatch SGD over ``(X, y)``, in place: a round of local training.

Each epoch visits every sample once in the order ``rng.permutation(n)`` draws, in minibatches
of ``batch_size`` rows (the last one may be smaller), each a :func:`mlp_sgd_step_`. All the
epochs run in one call without the GIL (shuffle, minibatch gather and steps), so a device's
predictions never queue behind the Python glue of a training loop. The permutations are
NumPy's own: ``arange(n)`` shuffled by Fisher-Yates with ``random_interval`` from the
BitGenerator, as ``Generator.permutation`` does.

Parameters
----------
layers, lr, momentum, weight_decay, mu, ref
    As in :func:`mlp_sgd_step_`.
X : ndarray of float32, shape (n, d), C-contiguous
    All the samples, n >= 1.
y : ndarray of integers, shape (n,)
    Their class labels.
rng : numpy.random.Generator
    Draws each epoch's order; its BitGenerator lock is held for the whole call.
epochs : int
    Passes over the data, >= 1.
batch_size : int
    Rows per step, >= 1; ``min(batch_size, n)`` is used.
state : SGDState, optional
    Built for these layer sizes with ``max_batch >= min(batch_size, n)``; its velocity
    carries over from earlier calls. Without one, a fresh state (zero velocity) is used.

Returns
-------
float
    The mean over the last epoch's minibatches of each batch's loss before its step.

Raises
------
TypeError, ValueError
    For a bad argument, naming it; nothing is changed.
TrainingDiverged
    When a batch's loss is not finite; the steps before it stay applied.
"""

DOCS["SGDState"] = """Momentum buffers and scratch memory for repeated steps of one architecture.

Parameters
----------
sizes : sequence of int
    Layer widths from input to output: ``(d, c)`` for softmax regression, ``(64, 32, 10)``
    for a 64-32-10 MLP. At least two entries, each >= 1.
max_batch : int
    The largest minibatch (rows of ``X``) a step with this state may take, >= 1.

Attributes
----------
sizes : tuple of int
    The layer widths the state was built for.
max_batch : int
    The largest minibatch it accepts.
velocity : tuple of (ndarray, ndarray)
    One ``(vW, vb)`` float32 pair per layer, shaped like ``(W, b)``, zero at first. The
    step updates these arrays in place; write into them (or call :meth:`reset`) to change
    them.

Notes
-----
A state belongs to one training thread: two steps must not use it at the same time (they
would share its scratch buffers).
"""


def document(*objects) -> None:
    """Give each function (or Python class) its ``__doc__`` from :data:`DOCS`, by ``__name__``."""
    for obj in objects:
        obj.__doc__ = DOCS[obj.__name__]
