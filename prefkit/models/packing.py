"""Padding-free forward passes: the rows of a padded batch packed into one sequence.

A batch of R rows right-padded to T positions makes every linear layer of the model work on
R x T positions, of which only the N real tokens matter (in the DPO quickstart pairs about 18% of
the positions are padding). Here the N tokens are packed into one sequence ``[1, N]`` with
position ids that restart at every row, so the projections, the MLPs, the norms and the LM head run
on N positions only. Attention must still keep the rows apart: :func:`engine_attention` gathers each
row's queries, keys and values back into the padded layout, runs causal SDPA there (the same
attention work as the padded batch, nothing across rows) and scatters the result back.

Rows that begin with the same tokens (a prompt under its chosen and its rejected answer, or under a
group of sampled completions) share those tokens' slots in the packed sequence: a causal model's
states there depend only on the tokens before, so they are computed once. In the DPO quickstart
pairs the prompts are about an eighth of the tokens.

The result equals the padded forward pass up to float rounding (the matmuls see other shapes):
bit-identical on SmolLM2 in fp32 on the machine it was measured on, and within 1e-5 on the tiny test
models (``tests/test_packing.py``).

Used only where it is known to be right: decoder-only architectures whose attention transformers
runs through its attention interface (:data:`PACKABLE_MODEL_TYPES`), without a sliding window, on
SDPA, without gradient checkpointing (its recomputation would run outside the switch below). Any
other model keeps the padded forward. Each model is also checked once against the padded forward on
a small input before its first packed pass (:func:`can_pack`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from prefkit.models.precision import cpu_attention_in_fp32

ATTENTION_NAME = "prefkit_packed"

# Architectures whose decoder layers pass the forward's keyword arguments on to the attention
# interface and whose attention is plain causal softmax attention (no sliding window checked below,
# no soft-capping, no ALiBi).
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2", "granite"})

# Pack only when at least this share of a batch's positions is saved (padding, and prefixes shared
# with an earlier row): below it the gather and scatter around attention cost about what packing saves.
MIN_SAVED_SHARE = 0.05


@dataclass(frozen=True)
class Packing:
    """How the rows of a ``[R, T]`` batch sit in the packed sequence ``[1, N]``.

    A row whose first tokens equal an earlier row's (the same prompt under a chosen and a rejected
    answer, or under a group of sampled completions) reads those tokens from the earlier row's slots:
    N counts each shared prefix once."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N], 0 at each row's first token
    slots: torch.Tensor  # [R, T] long: the packed index of each real padded position (0 elsewhere)
    gather: torch.Tensor  # [R * L] long: packed index of row r's j-th token at r * L + j (0 beyond the row)
    scatter: torch.Tensor  # [N] long: where each packed token's own row holds it in that [R * L] layout
    longest: int  # L, the longest row
    shared: int  # tokens read from an earlier row's slots instead of packed again

    def positions(self, keep: torch.Tensor) -> torch.Tensor:
        """The packed indices ``[K]`` of the K positions where ``keep`` ``[R, T]`` is true, row-major
        (an index repeats where two rows share the position)."""
        return self.slots[keep]


def plan(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, share_prefixes: bool = True) -> Packing | None:
    """The packing of a batch whose rows each hold their tokens in one contiguous run; None when
    there is too little to gain from it (padding and shared prefixes under MIN_SAVED_SHARE of the
    positions), or a row's tokens are not contiguous.

    With ``share_prefixes`` each row takes the longest run of leading tokens it has in common with an
    earlier row (the first such row on a tie) from that row's slots. A causal model computes those
    positions from the same tokens at the same positions, so the result is the same; only their
    packed slots are shared, and the attention of :func:`_attend` still gives every row its own keys."""
    real = attention_mask.bool()
    rows_count, width = real.shape
    lengths = real.sum(-1)
    if rows_count < 2 or int(lengths.sum()) == 0:
        return None
    first = real.float().argmax(-1)  # each row's first token (0 for an empty row)
    offsets = torch.arange(width, device=real.device)
    contiguous = (offsets >= first[:, None]) & (offsets < (first + lengths)[:, None])
    if not torch.equal(contiguous, real):
        return None
    longest = int(lengths.max())
    j = torch.arange(longest, device=real.device)
    in_row = j[None, :] < lengths[:, None]  # [R, L]
    aligned = input_ids.gather(1, (first[:, None] + j[None, :]).clamp(max=width - 1))  # each row from its first token
    leader, common = _shared_prefixes(aligned, in_row) if share_prefixes else ([0] * rows_count, [0] * rows_count)
    # Built on the CPU (one small loop over the rows), then moved to the batch's device.
    index = torch.zeros((rows_count, longest), dtype=torch.long)  # packed slot of (r, j)
    owner = []  # for each packed slot in order: its own row's (r, j) in the [R * L] layout
    total = 0
    for r, n in enumerate(lengths.tolist()):
        p = common[r]
        if p:
            index[r, :p] = index[leader[r], :p]
        index[r, p:n] = torch.arange(total, total + n - p)
        owner.append(torch.arange(r * longest + p, r * longest + n))
        total += n - p
    if 1 - total / (rows_count * width) < MIN_SAVED_SHARE:
        return None
    index = index.to(real.device)
    scatter = torch.cat(owner).to(real.device)
    slot_of_token = index[in_row]  # every row's tokens in row-major order, each at its packed slot
    packed_ids = torch.empty(total, dtype=input_ids.dtype, device=input_ids.device)
    packed_ids[slot_of_token] = aligned[in_row]
    positions = torch.empty(total, dtype=torch.long, device=real.device)
    positions[slot_of_token] = j.expand(rows_count, -1)[in_row]
    slots = torch.zeros((rows_count, width), dtype=torch.long, device=real.device)
    slots[real] = slot_of_token
    return Packing(
        input_ids=packed_ids.unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        slots=slots,
        gather=index.flatten(),  # 0 beyond each row, as index was made
        scatter=scatter,
        longest=longest,
        shared=int(lengths.sum()) - total,
    )


# Above this many token comparisons (rows x rows x longest row, a byte each) prefixes are not looked for.
MAX_PREFIX_COMPARISONS = 16 * 1024 * 1024


def _shared_prefixes(aligned: torch.Tensor, in_row: torch.Tensor) -> tuple[list[int], list[int]]:
    """For each row, the earlier row it shares the longest run of leading tokens with, and that
    length (0: none; all 0 for a batch too large to compare)."""
    rows_count, longest = aligned.shape
    if rows_count * rows_count * longest > MAX_PREFIX_COMPARISONS:
        return [0] * rows_count, [0] * rows_count
    same = (aligned[:, None, :] == aligned[None, :, :]) & in_row[:, None, :] & in_row[None, :, :]  # [R, R, L]
    common = same.to(torch.uint8).cumprod(-1).sum(-1).tril(-1)  # [r, r'] for the earlier rows r' < r only
    length, leader = common.max(-1)  # the first such row on a tie
    return leader.tolist(), length.tolist()


def _attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, prefkit_packing=None, **kwargs):
    """The engine's attention: causal attention within each packed row (for the packed call's
    ``prefkit_packing``), else transformers' SDPA. Under bf16 autocast on a CPU where fp32 attention
    measured faster (:func:`prefkit.models.precision.cpu_attention_in_fp32`) it runs in fp32, outside
    autocast, and returns bf16 as autocast would."""
    if (query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and cpu_attention_in_fp32()):
        with torch.autocast("cpu", enabled=False):
            out, weights = _attend(module, query.float(), key.float(), value.float(), attention_mask, scaling,
                                   dropout, prefkit_packing, **kwargs)
        return out.to(torch.bfloat16), weights
    return _attend(module, query, key, value, attention_mask, scaling, dropout, prefkit_packing, **kwargs)


def _attend(module, query, key, value, attention_mask, scaling, dropout, packing, **kwargs):
    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    rows, width = packing.gather.numel() // packing.longest, packing.longest
    # [1, heads, N, d] -> [R, heads, L, d]: each row's tokens from position 0, padding after them.
    q, k, v = (t[0].index_select(1, packing.gather).unflatten(1, (rows, width)).transpose(0, 1)
               for t in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1]
    )
    # [R, heads, L, d] -> [1, N, heads, d], the layout transformers expects back.
    return out.transpose(1, 2).flatten(0, 1).index_select(0, packing.scatter).unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, _attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft or DDP wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


def supported(model: torch.nn.Module) -> bool:
    """Whether ``model``'s architecture and settings allow a packed forward (before the check)."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) is not None or any(
        kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()
    ):
        return False
    name = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return not getattr(inner, name, False)


@contextlib.contextmanager
def engine_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within this block ``model`` (one that is :func:`supported`) runs its attention through
    :func:`_attention`."""
    config = unwrap(model).config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before


def attention(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """:func:`engine_attention` for a :func:`supported` model; for any other, a block that changes nothing."""
    return engine_attention(model) if supported(model) else contextlib.nullcontext()


def forward(model: torch.nn.Module, packing: Packing, **kwargs) -> object:
    """``model``'s forward pass over the packed sequence (``kwargs`` as for the padded call, with
    ``logits_to_keep`` already in packed order)."""
    with engine_attention(model):
        return model(input_ids=packing.input_ids, position_ids=packing.position_ids, prefkit_packing=packing,
                     use_cache=False, **kwargs)


_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def can_pack(model: torch.nn.Module) -> bool:
    """:func:`supported`, and the packed forward equals the padded one on three short rows (checked once
    per model, without gradients). ``model`` is a causal LM or a bare backbone (its last hidden states
    are compared)."""
    if not supported(model):
        return False
    inner = unwrap(model)
    verdict = _checked.get(inner)
    if verdict is None:
        verdict = _agrees(model)
        _checked[inner] = verdict
    return verdict


def _output(out: object) -> torch.Tensor | None:
    """A causal LM's logits or a backbone's last hidden states, ``[R, T, D]``."""
    value = getattr(out, "logits", None)
    if value is None:
        value = getattr(out, "last_hidden_state", None)
    return value if isinstance(value, torch.Tensor) and value.dim() == 3 else None


def _agrees(model: torch.nn.Module) -> bool:
    inner = unwrap(model)
    device = next(inner.parameters()).device
    vocab = int(inner.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=generator)
    ids[1, :4] = ids[0, :4]  # the second row shares exactly its first 4 tokens with the first
    ids[1, 4] = (ids[0, 4] + 1) % vocab
    ids[2, 0] = (ids[0, 0] + 1) % vocab  # the third none
    ids = ids.to(device)
    mask = torch.zeros((3, 12), dtype=torch.long, device=device)
    for row, length in enumerate((12, 7, 3)):
        mask[row, :length] = 1
    packing = plan(ids, mask)
    keep = mask.bool()

    def call(**kwargs):
        # The class's own forward, in fp32: not an instance-level wrapper such as the autocast one
        # accelerate puts on a prepared model, so the verdict does not depend on when it is taken.
        return type(inner).forward(inner, use_cache=False, **kwargs)

    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        padded = _output(call(input_ids=ids, attention_mask=mask))
        if padded is None:
            return False
        try:
            with engine_attention(inner):
                packed = _output(call(input_ids=packing.input_ids, position_ids=packing.position_ids,
                                      prefkit_packing=packing))[0]
        except (TypeError, ValueError, RuntimeError):
            return False
    expected = padded[keep].float()
    if packed.shape[0] != packing.input_ids.shape[1] or packing.shared != 4:
        return False
    packed = packed[packing.positions(keep)]
    scale = float(expected.abs().max()) + 1.0
    return bool((packed.float() - expected).abs().max() <= 1e-4 * scale)
