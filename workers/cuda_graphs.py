"""CUDA graphs: one graph per padded step shape, replayed with fresh inputs.

A step of a small model is hundreds of tiny kernel launches, and launching them from Python costs
far more than running them (a 128-token prefill of Qwen3-0.6B: ~1.4 ms on an H100's GPU, ~22 ms of
eager launches). Replaying a captured graph turns them into one launch. Each graph reads its inputs
from static buffers: what lies past the live step is padding (slot -1: no KV write; seq_len 0 or
an empty query: no reads), and padded rows are row-local garbage that nothing reads back.

  DecodeGraphs:  decode-only steps, one graph per padded number of rows; also steps whose every
                 query is short (a prefix-cache hit's few new tokens), one row per token.
  PrefillGraphs: any other step within the step budget (prefills, prefix-cache hits, chunks mixed
                 with decodes), one graph per padded number of tokens.
Even a 16k-token prefill step is bound by its launches: on an H100 its ~300 eager launches took
~48 ms of host time, about as long as the whole step's span on the device (offline --trace).
"""
import numpy as np
import torch

from workers.attention.base import AttentionMetadata
from workers.attention.row_groups import query_row_groups
from workers.graph_inputs import PackedInputs
from workers.input_batch import StepInputs
from workers.pinned_staging import PinnedStaging


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (as vLLM): padding stays small."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


# The longest query a decode graph takes as one row per token. As plain rows, q rows of one
# sequence read its K/V q times (from L2 after the first); the prefill kernel reads it once per
# 128-row tile but pays for a split and a merge on a few tokens. 4 rows over a 2k context: 10.4 us
# a layer against 14.7 for the split prefill and its merge (H100, s8-call3); at 1 row the decode
# kernel takes 7.7, so near 8-10 rows the two cross. In the query-row graphs (steps of at most
# this many rows) a query's rows share programs and read its K/V once: the warm 2k-prefix hit's
# 4-row graph spans 0.852 ms against 0.899 as plain rows (H200, s20-call4).
MAX_QUERY_ROWS = 8


def as_decode_rows(inputs: StepInputs) -> tuple[np.ndarray, np.ndarray]:
    """(seq_lens [T], block_tables [T, blocks]) that make each token of the step its own decode row.

    A token at position p attends to its sequence's first p + 1 tokens, its own K/V included:
    every layer writes the whole step's K/V to the cache before its attention reads, so a query's
    earlier tokens are there for the later ones, as causal attention over the query needs."""
    if len(inputs.input_ids) == len(inputs.req_ids):
        return inputs.seq_lens, inputs.block_tables
    # one numpy call each: on a prefix hit's path every call costs ~5-10 us in place (H200 host)
    return (np.add(inputs.positions, 1, dtype=np.int32), inputs.block_tables.repeat(inputs.query_lens, axis=0))


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device, staging: PinnedStaging):
        self.model = model
        self.staging = staging  # the step's inputs reach the static buffers through it
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        self.max_blocks = max_blocks = -(-max_model_len // block_size)
        attn = model.model.layers[0].self_attn  # every layer has the same heads (per rank)
        self.group = attn.num_heads // attn.num_kv_heads

        def fields(bs: int) -> list:
            return [("input_ids", torch.long, (bs,)), ("positions", torch.long, (bs,)),
                    ("slot_mapping", torch.long, (bs,)), ("seq_lens", torch.int32, (bs,)),
                    ("row_groups", torch.int32, (bs,)),
                    ("block_tables", torch.int32, (bs, max_blocks))]  # last: copied up to the live rows

        buffer = torch.zeros(PackedInputs.packed_bytes(fields(self.sizes[-1])), dtype=torch.uint8, device=device)
        self.inputs = {bs: PackedInputs(fields(bs), buffer) for bs in self.sizes}
        self.query_start_loc = torch.arange(self.sizes[-1] + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # steps of a few rows that hold a query's tokens (a prefix-cache hit) replay graphs whose
        # decode kernel takes a query's rows in one program (row_groups.py); the others keep the
        # plain kernel, which reading row groups made ~2% slower (batch-1 decode 0.774 against
        # 0.758 ms a step, H200, s20-call4). Larger steps with a query run as plain rows.
        self.query_sizes = [bs for bs in self.sizes if 1 < bs <= MAX_QUERY_ROWS]
        self.query_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.query_outputs: dict[int, torch.Tensor] = {}
        self.query_row_steps = 0  # steps that ran a query of several tokens as rows

    def _metadata(self, bs: int, query_rows: bool) -> AttentionMetadata:
        # max_seq_len is the longest context any replay may see: it fixes the decode split count
        v = self.inputs[bs].views
        return AttentionMetadata(v["slot_mapping"], self.query_start_loc[:bs + 1], v["seq_lens"],
                                 v["block_tables"], list(range(bs + 1)), [self.max_model_len] * bs,
                                 1, self.max_model_len, row_groups=v["row_groups"] if query_rows else None)

    def args(self, bs: int, query_rows: bool = False) -> tuple:
        """The model's arguments for a graph of bs rows (of query_rows: with row groups): views of
        the static buffers."""
        v = self.inputs[bs].views
        return v["input_ids"], v["positions"], self.kv_caches, self._metadata(bs, query_rows)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        # largest first, so smaller graphs reuse its memory
        for bs, query_rows in [(bs, False) for bs in reversed(self.sizes)] + [(bs, True) for bs in
                                                                                reversed(self.query_sizes)]:
            # every row padding for the warm-up and capture: no KV written, none read
            self.inputs[bs].reset({"input_ids": 0, "positions": 0, "slot_mapping": -1, "seq_lens": 0,
                                   "row_groups": 1})
            args = self.args(bs, query_rows)
            self.model(*args)  # warm-up outside the capture: Triton compiles, allocators settle
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = self.model(*args)
            graphs, outputs = (self.query_graphs, self.query_outputs) if query_rows else (self.graphs, self.outputs)
            graphs[bs], outputs[bs] = graph, output
        torch.cuda.synchronize()

    def can_run(self, inputs: StepInputs) -> bool:
        num_tokens, num_seqs = len(inputs.input_ids), len(inputs.req_ids)
        return (num_tokens <= self.sizes[-1] and inputs.block_tables.shape[1] <= self.max_blocks
                and (num_tokens == num_seqs or max(inputs.query_lens) <= MAX_QUERY_ROWS))

    def run(self, inputs: StepInputs, fill=None) -> torch.Tensor:
        """hidden states [T, H] of the step's tokens, one row each; fill(input_ids) as ModelRunner._forward."""
        n = len(inputs.input_ids)
        bs = next(s for s in self.sizes if s >= n)
        seq_lens, block_tables = as_decode_rows(inputs)
        has_query = n > len(inputs.req_ids)
        self.query_row_steps += has_query
        packed = self.inputs[bs]
        # padding rows: token 0 at position 0 (valid indices), no KV written and none read
        arrays = {"input_ids": (inputs.input_ids, 0), "positions": (inputs.positions, 0),
                  "slot_mapping": (inputs.slot_mapping, -1), "seq_lens": (seq_lens, 0),
                  "block_tables": (block_tables, None)}
        # a query's rows share decode programs (row_groups.py), which read its context once
        query_rows = has_query and bs in self.query_graphs
        if query_rows:  # a padding row is a program of its own
            arrays["row_groups"] = (query_row_groups(inputs.query_lens, self.group), 1)
        packed.put(self.staging, arrays, live_rows=n)
        if fill is not None:
            fill(packed.views["input_ids"])
        if query_rows:
            self.query_graphs[bs].replay()
            return self.query_outputs[bs][:n]
        self.graphs[bs].replay()
        return self.outputs[bs][:n]


def prefill_token_sizes(max_num_batched_tokens: int) -> list[int]:
    """Graph token counts for the steps that are not decode-only, up to the step budget.

    Powers of two from 4 to 256, then steps that keep a step's padding under ~1/4 of its live
    tokens and under ~1/8 past 2k: every 128 to 1024, every 256 to 4096, every 512 to 8192,
    every 1024 beyond, and the budget itself. Padded rows cost full GEMM time: with the old
    ladder (every 2048 past 2048) a 2,052-token prompt ran the 4,096-token graph, twice its work.
    The smallest sizes serve prefix-cache hits, whose few new tokens would otherwise pad to 16.
    """
    ladder = [4, 8, 16, 32, 64, 128, 256, 384, 512]
    for step, top in ((128, 1024), (256, 4096), (512, 8192)):
        ladder += list(range(ladder[-1] + step, top + 1, step))
    ladder += list(range(ladder[-1] + 1024, max_num_batched_tokens, 1024))
    return [t for t in ladder if t < max_num_batched_tokens] + [max_num_batched_tokens]


class PrefillGraphs:
    """Steps with more than one token per sequence somewhere, padded to the next token size.

    A graph fixes the number of tokens T and of sequences S (max_num_seqs). The attention kernel
    has one program per query tile that exists (prefill_tile_map, computed on the device in the
    graph), so a padded step costs no more attention programs than its live tokens need. Padded
    sequences get an empty query (query_start_loc stays at the live token count) and seq_len 0;
    padded tokens get slot -1 and belong to no sequence.
    """

    def __init__(self, model, kv_caches: list[torch.Tensor], max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, block_size: int, device: torch.device, staging: PinnedStaging):
        self.model = model
        self.staging = staging
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.sizes = prefill_token_sizes(max_num_batched_tokens)
        self.max_seqs = max_num_seqs
        max_t = self.sizes[-1] if self.sizes else 0
        self.max_blocks = max_blocks = -(-max_model_len // block_size)
        s = self.max_seqs

        def fields(t: int) -> list:
            return [("input_ids", torch.long, (t,)), ("positions", torch.long, (t,)),
                    ("slot_mapping", torch.long, (t,)), ("query_start_loc", torch.int32, (s + 1,)),
                    ("seq_lens", torch.int32, (s,)),
                    ("block_tables", torch.int32, (s, max_blocks))]  # last: copied up to the live rows

        buffer = torch.zeros(PackedInputs.packed_bytes(fields(max_t)), dtype=torch.uint8, device=device)
        self.inputs = {t: PackedInputs(fields(t), buffer) for t in self.sizes}
        # every graph writes its hidden states here: only one step's forward runs at a time and its
        # logits are computed in stream order before the next replay, so ~40 sizes cost one buffer
        # (a graph's own output would stay in the pool for good: ~370 MB at a 16k budget)
        weight = next(model.parameters())
        self.hidden = torch.empty(max_t, model.config.hidden_size, dtype=weight.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0

    def _metadata(self, num_tokens: int) -> AttentionMetadata:
        # max_query_len = T sizes the attention grid for any query that fits; the host lists only
        # give the sequence count (no backend reads their values on the Triton path)
        s, v = self.max_seqs, self.inputs[num_tokens].views
        return AttentionMetadata(v["slot_mapping"], v["query_start_loc"], v["seq_lens"], v["block_tables"],
                                 [0] * (s + 1), [self.max_model_len] * s, num_tokens, self.max_model_len)

    def args(self, num_tokens: int) -> tuple:
        """The model's arguments for a graph of num_tokens: views of the static buffers."""
        v = self.inputs[num_tokens].views
        return v["input_ids"], v["positions"], self.kv_caches, self._metadata(num_tokens)

    def forward(self, num_tokens: int) -> None:
        """The model over the first num_tokens of the buffers, into self.hidden (what a graph holds)."""
        self.model(*self.args(num_tokens), out=self.hidden[:num_tokens])

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        for t in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self.inputs[t].reset({"input_ids": 0, "positions": 0, "slot_mapping": -1, "query_start_loc": 0,
                                  "seq_lens": 0})
            self.forward(t)  # every sequence empty and every slot -1: reads and writes no KV
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.forward(t)
            self.graphs[t] = graph
        torch.cuda.synchronize()

    def can_run(self, inputs: StepInputs) -> bool:
        return (bool(self.sizes) and len(inputs.input_ids) <= self.sizes[-1]
                and len(inputs.req_ids) <= self.max_seqs
                and inputs.block_tables.shape[1] <= self.max_blocks)

    def run(self, inputs: StepInputs, fill=None) -> torch.Tensor:
        """hidden states [T, H] of the step's tokens; fill(input_ids) as ModelRunner._forward."""
        n, s = len(inputs.input_ids), len(inputs.req_ids)
        t = next(size for size in self.sizes if size >= n)
        packed = self.inputs[t]
        # padding tokens: token 0 at position 0, no KV written; padding sequences: empty queries
        # and no context
        packed.put(self.staging, {"input_ids": (inputs.input_ids, 0), "positions": (inputs.positions, 0),
                                  "slot_mapping": (inputs.slot_mapping, -1),
                                  "query_start_loc": (inputs.query_start_loc, n), "seq_lens": (inputs.seq_lens, 0),
                                  "block_tables": (inputs.block_tables, None)}, live_rows=s)
        if fill is not None:
            fill(packed.views["input_ids"])
        self.graphs[t].replay()
        self.replays += 1
        return self.hidden[:n]
