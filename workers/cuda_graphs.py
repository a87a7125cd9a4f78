"""CUDA graphs for decode steps: one graph per padded batch size, replayed with fresh inputs.

A decode step of a small model is hundreds of tiny kernel launches; replaying a captured graph
turns them into one launch, so the GPU no longer waits on Python. Each graph reads its inputs from
static buffers: rows past the live batch are padding (slot -1: no KV write; seq_len 0: no reads).
"""
import torch

from workers.attention.base import AttentionMetadata
from workers.input_batch import StepInputs


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (as vLLM): padding stays small."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        max_bs = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, bs: int) -> AttentionMetadata:
        # max_seq_len is the longest context any replay may see: it fixes the decode split count
        return AttentionMetadata(self.slot_mapping[:bs], self.query_start_loc[:bs + 1], self.seq_lens[:bs],
                                 self.block_tables[:bs], list(range(bs + 1)), [self.max_model_len] * bs,
                                 1, self.max_model_len)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._metadata(bs))
            self.model(*args)  # warm-up outside the capture: Triton compiles, allocators settle
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(*args)
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, inputs: StepInputs) -> bool:
        num_seqs = len(inputs.req_ids)
        return (num_seqs <= self.sizes[-1] and len(inputs.input_ids) == num_seqs
                and inputs.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, inputs: StepInputs, fill=None) -> torch.Tensor:
        """hidden states [num_seqs, H] of a decode-only step; fill(input_ids) as ModelRunner._forward."""
        n = len(inputs.req_ids)
        bs = next(s for s in self.sizes if s >= n)
        width = inputs.block_tables.shape[1]
        def put(buffer: torch.Tensor, array) -> None:
            # from pinned memory: an asynchronous copy that does not wait for the step in flight
            buffer.copy_(torch.from_numpy(array).pin_memory(), non_blocking=True)

        put(self.input_ids[:n], inputs.input_ids)
        put(self.positions[:n], inputs.positions)
        put(self.slot_mapping[:n], inputs.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        put(self.seq_lens[:n], inputs.seq_lens)
        self.seq_lens[n:bs].fill_(0)
        put(self.block_tables[:n, :width], inputs.block_tables)
        if fill is not None:
            fill(self.input_ids)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
