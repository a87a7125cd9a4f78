"""When a sequence stops: the scheduler's checks on the tokens a step sampled for it."""
from scheduler.request import RequestStatus, Sequence


def check_stop(seq: Sequence, token_id: int, eos_token_ids: frozenset[int], max_seq_len: int) -> RequestStatus | None:
    """How seq ends with token_id just appended to its outputs, or None if it goes on."""
    # a new stop condition here must make no_stop_among return False too
    params = seq.sampling_params
    num_output = len(seq.output_token_ids)
    if num_output >= params.min_tokens:
        if token_id in eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED  # stop_reason stays None for eos, as in vLLM
        if params.stop_token_ids and token_id in params.stop_token_ids:
            seq.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
    if num_output + len(seq.prompt_token_ids) >= max_seq_len or (
            params.max_tokens is not None and num_output >= params.max_tokens):
        return RequestStatus.FINISHED_LENGTH
    return None


def no_stop_among(seq: Sequence, token_ids: list[int], eos_token_ids: frozenset[int], max_seq_len: int) -> bool:
    """check_stop would pass every one of token_ids (appended after seq's outputs): no length
    limit is reached and no eos or stop token is among them. Checked at C speed over the list."""
    params = seq.sampling_params
    num_after = len(seq.output_token_ids) + len(token_ids)
    if num_after + len(seq.prompt_token_ids) >= max_seq_len or (
            params.max_tokens is not None and num_after >= params.max_tokens):
        return False
    if not params.ignore_eos and not eos_token_ids.isdisjoint(token_ids):
        return False
    return not params.stop_token_ids or set(params.stop_token_ids).isdisjoint(token_ids)
