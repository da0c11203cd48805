"""Masks of chosen, rejected, padding and the prompt/answer boundary."""

from types import SimpleNamespace

import torch

from prefkit.data.batching import BatchOrder, collate

PAD = 0


def ex(prompt, chosen, rejected=None, margin=None):
    completions = {"chosen": chosen} if rejected is None else {"chosen": chosen, "rejected": rejected}
    return SimpleNamespace(prompt_ids=prompt, completions=completions, columns={} if margin is None else {"margin": margin})


def test_pairs_put_chosen_then_rejected_rows_with_right_padding():
    batch = collate([ex([11, 12], [21], [31, 32, 33]), ex([13], [22, 23], [34])], [7, 3], PAD, ("chosen", "rejected"))
    # rows: prompt+chosen for both examples, then prompt+rejected; width = longest row (2+3 = 5)
    assert batch.input_ids.tolist() == [
        [11, 12, 21, PAD, PAD],
        [13, 22, 23, PAD, PAD],
        [11, 12, 31, 32, 33],
        [13, 34, PAD, PAD, PAD],
    ]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # the answer starts right after the prompt and stops before the padding
    assert batch.completion_mask.int().tolist() == [
        [0, 0, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
    ]
    assert batch.indices.tolist() == [7, 3]
    assert batch.num_examples == 2 and batch.num_tokens == 3 + 3 + 5 + 2
    assert batch.columns == {}
    assert batch.rows_of("rejected") == slice(2, 4)


def test_sft_rows_and_margins():
    batch = collate([ex([1], [2, 3], margin=0.5), ex([4, 5], [6], margin=1.0)], [0, 1], PAD, ("chosen",))
    assert batch.input_ids.shape == (2, 3)
    assert batch.completion_mask.int().tolist() == [[0, 1, 1], [0, 0, 1]]
    assert torch.equal(batch.columns["margin"], torch.tensor([0.5, 1.0]))


def test_batch_order_depends_only_on_seed_and_counter():
    a, b = BatchOrder(10, 4, seed=3), BatchOrder(10, 4, seed=3)
    seen = [a.indices(k) for k in range(6)]
    # 3 micro-batches per epoch (4 + 4 + 2); each epoch covers every example once
    assert a.batches_per_epoch == 3
    assert sorted(sum(seen[:3], [])) == list(range(10))
    assert sorted(sum(seen[3:], [])) == list(range(10))
    assert seen[:3] != seen[3:]  # a new permutation per epoch
    # random access (as after a resume) gives the same batches
    assert [b.indices(k) for k in (5, 1, 4)] == [seen[5], seen[1], seen[4]]
    assert BatchOrder(10, 4, seed=4).indices(0) != seen[0] or BatchOrder(10, 4, seed=4).indices(1) != seen[1]
