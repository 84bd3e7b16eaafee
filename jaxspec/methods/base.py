"""The method protocol: what every decoding method is, with no-op defaults.

A method is a frozen dataclass (hashable: a jit static argument) deriving from `Method`. The
engine runs one step shape for all of them (`jaxspec.methods.speculative.speculative_step`):

    draft, mstate = method.propose(model, mparams, state, sampling, key, attn_impl)   # tree of `tree.size` tokens
    logits, hidden, cache = model(cache, draft.tokens, positions, method.forward_mask)
    target = argmax (greedy) or p (sampling) of the logits, over the rows the forward ran
    verdict = method.verify(draft, logits, sampling, key, target)           # accepted path + next token
    cache = commit(cache, verdict.path, n)                                  # per row
    mstate = method.update(mstate, state, draft, logits, hidden, verdict, n)

AR is the empty draft (`tree` = the pending token alone): the verifier then samples the next
token from the target, exactly as plain decoding does.

Hooks, all optional (the defaults do nothing):
* `resolve(bundle)`: concrete options for this model (a template picked by measured timings,
  a drafter loaded and checked); runs before any state is built.
* `load_params(bundle)`: the method's own parameters (a drafter's weights, trained heads): a
  pytree of `nnx.Param` with logical axes, placed and sharded like the model's and passed to
  every hook below as `mparams` (None: the method has none).
* `target_params(bundle)`: the model weights this method decodes with when they are not the
  bundle's (LUD: the base with its fine-tune's adapters merged); None (default): the bundle's.
* `init_method_state(config, B, num_slots, dtype, mparams)` and `method_state_axes(mstate)`:
  the state carried between steps and its logical axes (None: replicated, KV caches inside
  sharded like the target's).
* `has_prefill = True` with `prefill(model, mparams, state, prompt_len, attn_impl, hidden)`: sees
  the prompt after its forward (`hidden`: the prompt's residuals [B, P, E] at the `capture`
  layers), e.g. a drafter's cache, an n-gram pool, the last prompt token's state. Methods
  without one share a compiled prefill.
* `memory_key`: state kept across calls in `bundle.method_memory` (Token Recycling's matrix);
  `remember(mstate)` is what is kept (default: the whole method state) and `recall(mstate,
  memory)` the next call's initial method state with it (default: the memory itself).
* `observe(bundle, mean_accepted, steps)`: acceptance seen in a call, for methods that adapt.
"""

from __future__ import annotations

import numpy as np

from jaxspec.decode_state import DecodeState, last_tokens
from jaxspec.methods.forward_layout import ForwardLayout
from jaxspec.sampling import SamplingConfig
from jaxspec.verify import Draft, TreeSpec, Verdict, verify


class Method:
  """Base of every decoding method. Subclasses set `name` and usually `tree`, `propose`, `update`."""

  name = "method"
  without_replacement = False  # drafts drawn without replacement (Gumbel-top-k)
  capture: tuple[int, ...] = ()  # hidden layers `update` reads
  memory_key: str | None = None
  has_prefill = False

  # ---- the forward's static layout -----------------------------------------------------

  @property
  def tree(self) -> TreeSpec:
    """The verified draft tree; the default is the empty draft (AR). A method whose rows choose
    their tree each step (`Draft.parents`) returns its bounds, a `jaxspec.verify.DynamicTree`."""
    return TreeSpec.chain(0)

  @property
  def forward_layout(self) -> ForwardLayout:
    """The forward's tokens: the verified tree, then any named extra segments."""
    return ForwardLayout(self.tree)

  @property
  def forward_depth(self) -> np.ndarray:
    """[T] position offset of each forward token after the pending token's position."""
    return self.forward_layout.depth

  @property
  def forward_mask(self) -> np.ndarray:
    """[T, T] which forward tokens each forward token attends to."""
    return self.forward_layout.mask

  @property
  def scratch_tokens(self) -> int:
    """T: tokens in one forward (cache scratch slots a step needs)."""
    return int(self.forward_depth.shape[0])

  @property
  def forward_sizes(self) -> tuple[int, ...]:
    """Forward sizes a step may run, ascending, the last `scratch_tokens`: prefixes of the
    forward layout. Each step runs the smallest that holds every row's valid draft nodes (see
    speculative.py), so a method that marks unused nodes invalid pays only for what it drafts.
    Prefixes must be closed under parents (tree templates are: parents come first)."""
    return (self.scratch_tokens,)

  @property
  def max_commit(self) -> int:
    """The most tokens one step commits (accepted drafts + the next token)."""
    return self.tree.max_depth + 1

  # ---- setup hooks ---------------------------------------------------------------------

  def resolve(self, bundle) -> "Method":
    return self

  def load_params(self, bundle):
    return None

  def target_params(self, bundle):
    return None

  def init_method_state(self, config, batch_size: int, num_slots: int, dtype, mparams=None):
    return ()

  def method_state_axes(self, method_state):
    return None

  def prefill(self, model, mparams, state: DecodeState, prompt_len: int, attn_impl, hidden):
    """The method state after the prompt's forward (only called when `has_prefill`); `hidden`:
    {layer: [B, P, E]} residuals of the padded prompt at the method's `capture` layers."""
    return state.method_state

  def observe(self, bundle, mean_accepted: float, steps: int) -> None:
    return None

  def remember(self, method_state):
    """What of the final method state `bundle.method_memory[memory_key]` keeps for the next call."""
    return method_state

  def recall(self, method_state, memory):
    """The initial method state of a call (`method_state`: fresh) given what an earlier call kept."""
    return memory

  # ---- the step ------------------------------------------------------------------------

  def propose(self, model, mparams, state: DecodeState, sampling: SamplingConfig, key, attn_impl="auto"):
    """(Draft of `scratch_tokens` tokens, column 0 the pending token; method state after drafting).
    `attn_impl` (a name or a placed `jaxspec.kernels.AttentionImpl`) goes to any forward it runs."""
    pending_Bx1 = last_tokens(state)[:, None]
    return Draft(tokens=pending_Bx1, valid=pending_Bx1 >= 0), state.method_state

  def verify(self, draft: Draft, logits_BxTxV, sampling: SamplingConfig, key, target=None) -> Verdict:
    """Accepted path and next token over the first `tree.size` forward tokens: the shared,
    lossless verifier (a method overrides this only to change the rule). `target`: the argmax
    (greedy) or target distribution (sampling) the step computed on the rows its forward ran
    (`jaxspec.verify.TargetRows`; None: not given)."""
    return verify(self.tree, draft, logits_BxTxV, sampling, key, self.without_replacement, target)

  def update(self, method_state, state: DecodeState, draft: Draft, logits_BxTxV, hidden, verdict: Verdict, n_B):
    """Method state after the verified step. `state` already holds the committed tokens; n_B is
    what each row actually committed (the verdict cut at EOS and budget)."""
    return method_state
