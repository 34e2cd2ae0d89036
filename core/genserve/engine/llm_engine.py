"""The engine: one ``step()`` schedules, runs the model and emits outputs.

With ``overlap`` (the runner's ``overlap_steps``, on for GPUs) a step launches the next batch
before it reads the previous batch's tokens, so the host's scheduling, input building and
output handling run while the device computes (vLLM's async scheduling, SGLang's overlap
scheduler). The scheduler sees the in-flight tokens as pending (``Sequence.num_pending``):
they take a position and a KV slot, and the next step reads them on the device. A sequence
that turns out to have finished gets one wasted token, which is discarded. Requests whose
sampling needs the host to know earlier tokens (penalties, watermark, grammars) make the
engine wait for each step instead.
"""

from __future__ import annotations

import logging
import random
import time

from genserve.engine.block_manager import BlockManager
from genserve.engine.config import EngineConfig
from genserve.engine.constraints import Constraint
from genserve.engine.detokenizer import DecodeState, Detokenizer
from genserve.engine.outputs import PromptToken, RequestOutput
from genserve.engine.sampler import check_rows
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.model_runner import LaunchedStep, ModelRunner
from genserve.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from genserve.engine.sequence import FinishReason, Sequence, TokenInfo
from genserve.engine.stop_strings import StopMatcher
from genserve.errors import EngineDeadError
from genserve.spec_decode.speculator import Speculator

logger = logging.getLogger(__name__)


def needs_host_history(p: SamplingParams) -> bool:
    """Sampling that reads the request's earlier token ids on the host, so it can't run
    before the previous step's tokens are back."""
    return (p.repetition_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)
            or p.watermark or p.constraint is not None)


def engine_failure(exc: BaseException) -> bool:
    """The engine itself failed (a tensor-parallel shard died): no request is to blame, and no
    retry without one can help, so the step's failure goes up to stop serving."""
    return isinstance(exc, EngineDeadError)


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, config: EngineConfig, num_blocks: int,
                 eos_token_ids: set[int], decoder_start_token_id: int | None = None,
                 speculator: Speculator | None = None):
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        # Set for encoder-decoder models: prompts feed the encoder, decoding starts from this token.
        self.decoder_start_token_id = decoder_start_token_id
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks, runner.model.recompute_at_length)
        if runner.lora is not None:  # LoRA slots of running requests' adapters are never evicted
            runner.lora.table.in_use = self.scheduler.adapters_in_use
        self.detok = Detokenizer(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.seqs: dict[str, Sequence] = {}
        self._decode: dict[str, DecodeState] = {}
        self._stops: dict[str, StopMatcher] = {}
        self.last_step_stats: dict = {}
        self.overlap = runner.overlap_steps
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
        self._num_host_history = 0  # live requests whose sampling reads earlier tokens on the host
        # Speculative decoding (spec_decode/): proposals are made from the host's token ids, so
        # each step's tokens must be read before the next is scheduled: no overlap.
        self.speculator = speculator
        if speculator is not None:
            self.overlap = False

    # -- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; the next ``step()`` calls may schedule it.

        ``prompt_ids``: the prompt's token ids (for an encoder-decoder model, the encoder's
        input; decoding then starts from ``decoder_start_token_id``). ``params.seed`` None
        draws a random 63-bit seed, reported in the outputs when the request samples. Lengths
        are not checked here (the server validates them against ``max_input_tokens`` and
        ``max_total_tokens``): a prompt larger than the whole KV cache comes back from a later
        ``step()`` as a finished output with ``finish_reason`` ERROR and ``error`` set.

        Raises ``ValueError`` if ``request_id`` is already in use by an unfinished request or
        ``prompt_ids`` is empty, ``TypeError`` if ``params.constraint`` is not a ``Constraint``.
        """
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if params.constraint is not None and not isinstance(params.constraint, Constraint):
            # Checked here, not at the first step: speculation calls every method of it.
            raise TypeError(f"SamplingParams.constraint must be a genserve.engine.constraints.Constraint, "
                            f"not {type(params.constraint).__name__}")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        check_rows(params, seed)  # a value the sampler can't take fails here, not in a shared step
        seq = Sequence(request_id, list(prompt_ids), params, seed=seed)
        if self.decoder_start_token_id is not None:
            seq.encoder_ids, seq.prompt_ids = seq.prompt_ids, [self.decoder_start_token_id]
        self.seqs[request_id] = seq
        if needs_host_history(params):
            self._num_host_history += 1
        self._decode[request_id] = self.detok.start(seq.prompt_ids)
        self._stops[request_id] = StopMatcher(params.stop)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, FinishReason.ABORTED)
        return self._finish_output(seq)

    def fail_request(self, request_id: str, message: str) -> RequestOutput | None:
        """End a request with ``FinishReason.ERROR`` and ``message`` (its KV blocks are freed);
        returns its final output, or None when the id is unknown (already finished)."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        seq.error = message
        self.scheduler.finish(seq, FinishReason.ERROR)
        return self._finish_output(seq)

    def adapter_users(self, adapter_id: str) -> int:
        """Unfinished requests (waiting or running) that use LoRA adapter ``adapter_id``; may be
        called from another thread (a snapshot)."""
        return sum(1 for s in list(self.seqs.values()) if s.params.adapter_id == adapter_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    # -- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step: schedule a batch, run the model on it, return what it produced.

        Returns at most one ``RequestOutput`` per request that produced a token this step (with
        overlap on, the tokens of the batch launched by the previous step), carrying the new
        tokens and text since the request's last output, plus a finished output for each
        request that can never fit the KV cache. A request's last output has ``finished``
        True and its ``finish_reason``; the engine forgets it then. Prefill-only steps of a
        chunked prompt return nothing for that request. ``last_step_stats`` holds the step's
        ``duration`` (seconds), ``num_seqs``, ``prefill_tokens`` and ``is_prefill``.

        Loop ``while engine.has_work: engine.step()`` to drain every request. Errors of the
        model or device (e.g. ``torch.OutOfMemoryError``) propagate; a sharded engine raises
        ``ShardFailure`` (an ``EngineDeadError``) when a worker rank is lost.
        """
        t0 = time.perf_counter()
        outputs: list[RequestOutput] = []
        # Taken off the engine first: a step that raises is never completed twice.
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and self._num_host_history:
            outputs += self._complete(*in_flight)  # the next batch needs its tokens first
            in_flight = None
        if self.speculator is not None:
            decoding = sum(1 for seq in self.scheduler.running if not seq.in_prefill)
            self.scheduler.lookahead = self.speculator.lookahead_for(decoding)
        plan = self.scheduler.schedule()
        outputs += [self._finish_output(seq) for seq in plan.failed]
        if self.speculator is not None and not plan.is_empty:
            self._propose(plan)
        launched = None
        if not plan.is_empty:
            try:
                launched = (plan, self._launch(plan))
            except Exception as exc:
                if engine_failure(exc):
                    raise
                if in_flight is not None:  # the retries read every input token on the host
                    outputs += self._complete(*in_flight)
                    in_flight = None
                outputs += self._isolate(plan.scheduled, exc)
        if in_flight is not None:
            outputs += self._complete(*in_flight)
        if launched is not None:
            if self.overlap:
                self._in_flight = launched
            else:
                outputs += self._complete(*launched)
            self.last_step_stats = {
                "duration": time.perf_counter() - t0,
                "num_seqs": len(plan.scheduled),
                "prefill_tokens": plan.num_prefill_tokens,
                "is_prefill": plan.num_prefill_tokens > 0,
            }
        return outputs

    def _propose(self, plan: SchedulerOutput) -> None:
        """Ask the proposer for this step's proposals. A proposer that fails costs the step
        its speculation, not its requests (the target decodes them as usual)."""
        assert self.speculator is not None
        try:
            self.speculator.propose(plan.scheduled)
        except Exception as exc:
            if engine_failure(exc):
                raise
            logger.error("speculative proposer failed; this step decodes without proposals: %s",
                         exc, exc_info=exc)
            for s in plan.scheduled:
                if s.spec:
                    s.spec, s.num_tokens = [], 1
        for s in plan.scheduled:  # slots reserved for proposals that did not come
            if s.lookahead > len(s.spec):
                self.blocks.trim(s.seq, len(s.seq) + len(s.spec))

    def _launch(self, plan: SchedulerOutput) -> LaunchedStep:
        """Queue the batch on the device and account its tokens as computed (and, where it
        samples, one token as pending: a verify row's k + 1 sampled rows give one pending)."""
        step = self.runner.launch(plan.scheduled)
        last_row = {i: row for row, i in enumerate(step.sampling_index)}
        for i, row in last_row.items():
            seq = plan.scheduled[i].seq
            seq.num_pending += 1
            seq.pending_row = row
        for s in plan.scheduled:
            s.start, s.block_table = s.seq.num_computed, s.seq.block_table
            s.seq.num_computed += s.num_tokens
        return step

    def _isolate(self, scheduled: list[ScheduledSeq], exc: Exception | None) -> list[RequestOutput]:
        """Run a step that raised ``exc`` again in halves, waiting for each, until every request
        that makes it raise is alone in its batch: those fail, the others compute this step's
        tokens as they would have (sampling is a pure function of seed and step, and rewriting
        a K/V slot with the same values is harmless). Failed requests free their blocks.

        ``exc`` is the failure of ``scheduled`` as given (None: not run yet); a group is split
        without a retry only while it is still that batch (requests finished in between are
        left out)."""
        live = [s for s in scheduled if not s.seq.is_finished]
        if not live:
            return []
        if len(live) != len(scheduled):
            exc = None
        if exc is None:
            plan = SchedulerOutput(scheduled=live)
            try:
                step = self._launch(plan)
            except Exception as err:
                if engine_failure(err):
                    raise
                exc = err
            else:
                return self._complete(plan, step)
        assert exc is not None  # the group raised, as given or retried just above
        if len(live) == 1:
            return [self._fail(live[0].seq, exc)]
        mid = len(live) // 2
        return self._isolate(live[:mid], None) + self._isolate(live[mid:], None)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """Finish one request with an error caused by it alone; its blocks are freed."""
        logger.error("request %s failed: %s", seq.request_id, exc, exc_info=exc)
        detail = (str(exc).strip().splitlines() or [""])[0]
        seq.error = f"generation failed: {type(exc).__name__}: {detail}"
        self.scheduler.finish(seq, FinishReason.ERROR)
        return self._finish_output(seq)

    def _complete(self, plan: SchedulerOutput, step: LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's tokens and turn them into outputs. A request whose output
        handling raises (its grammar, its detokenization) fails alone."""
        outputs = []
        results = step.results()
        now = time.monotonic()
        for s, r in zip(plan.scheduled, results):
            seq = s.seq
            if seq.is_finished:  # aborted, or finished by the previous step: a wasted token
                continue
            try:
                out = self._take_result(s, r, now)
            except Exception as exc:
                out = self._fail(seq, exc)
            if out is not None:
                outputs.append(out)
        if self.speculator is not None:
            self._observe(plan, results, step)
        return outputs

    def _observe(self, plan: SchedulerOutput, results, step: LaunchedStep) -> None:
        """Hand the step's hidden states to a proposer that drafts from them. A proposer that
        fails costs its requests' speculation state (rebuilt from their next steps), never
        the requests."""
        assert self.speculator is not None
        try:
            self.speculator.observe(plan.scheduled, results, step)
        except Exception as exc:
            if engine_failure(exc):
                raise
            logger.error("speculative proposer failed on the step's hidden states; its requests start "
                         "their proposals over: %s", exc, exc_info=exc)
            for s in plan.scheduled:
                self.speculator.proposer.forget(s.seq.request_id)

    def _take_result(self, s: ScheduledSeq, r, now: float) -> RequestOutput | None:
        seq = s.seq
        if s.spec:
            return self._take_verified(s, r, now)
        if seq.block_table is s.block_table:  # not preempted since: publish full blocks
            self.blocks.mark_computed(seq, s.start, s.start + s.num_tokens)
        if r.prompt_logprobs:
            # By position: a request preempted mid-prompt computes its first rows again.
            seq.prompt_logprobs[s.start:s.start + len(r.prompt_logprobs)] = r.prompt_logprobs
        if r.token is None:
            return None
        seq.num_pending -= 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        return self._append_token(seq, r.token, r.logprob, r.top)

    def _take_verified(self, s: ScheduledSeq, r, now: float) -> RequestOutput:
        """A verify step's result: the accepted proposals and the token after them. Only the
        last known token's and the accepted proposals' K/V are valid: the sequence's computed
        length drops back to them, and blocks held only for rejected positions are freed
        (their slots are overwritten by later steps either way)."""
        seq = s.seq
        assert self.speculator is not None
        valid = s.start + 1 + len(r.accepted)
        owned = seq.block_table is s.block_table  # not preempted since launch
        if owned:
            seq.num_computed = valid
            self.blocks.trim(seq, valid)
            self.blocks.mark_computed(seq, s.start, s.start + 1)
        seq.num_pending -= 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        out: RequestOutput | None = None
        emitted = 0
        for token, logprob, top in [*r.accepted, (r.token, r.logprob, r.top)]:
            emitted += 1
            step_out = self._append_token(seq, token, logprob, top)
            assert step_out is not None
            out = step_out if out is None else _merge(out, step_out)
            if out.finished:
                break
        self.speculator.record(seq, r.num_proposed, emitted - 1)
        assert out is not None
        out.spec_proposed, out.spec_accepted = seq.spec_proposed, seq.spec_accepted
        if owned and not seq.is_finished:
            self.blocks.mark_computed(seq, s.start + 1, valid)
        return out

    def _append_token(self, seq: Sequence, token: int, logprob: float, top) -> RequestOutput | None:
        p = seq.params
        seq.output_ids.append(token)
        special = token in self.detok.special_ids
        state = self._decode[seq.request_id]
        text = self.detok.step(state, seq.ids_from(state.prefix_offset), state.prefix_offset)
        info = TokenInfo(id=token, logprob=logprob, text=text if not special else
                         self.detok.token_text(token), special=special,
                         top=[(t, lp) for t, lp in top])
        seq.output_tokens.append(info)
        if p.constraint is not None:
            p.constraint.advance(token)

        reason, match = None, None
        if not p.ignore_eos and token in self.eos_token_ids:
            reason = FinishReason.EOS
        elif token in p.stop_token_ids:
            reason = FinishReason.STOP
        elif p.constraint is not None and p.constraint.is_finished():
            reason = FinishReason.EOS
        else:
            # Matched on the text with special tokens kept, as TGI does (engine/stop_strings.py).
            match = self._stops[seq.request_id].feed(info.text if special else text, special)
            if match is not None:
                if not special:  # the text ends with the stop (TGI's answer includes it)
                    text = info.text = text[: len(text) - match.after]
                reason = FinishReason.STOP
            if reason is None and (len(seq.output_ids) >= p.max_new_tokens
                                   or seq.num_known >= self.config.max_total_tokens):
                reason = FinishReason.LENGTH

        out = RequestOutput(
            request_id=seq.request_id, tokens=[info], text=text,
            num_prompt_tokens=seq.num_prompt_tokens, num_generated=len(seq.output_ids),
            seed=seq.seed if p.do_sample else None, arrival=seq.arrival,
            first_scheduled=seq.first_scheduled,
            spec_proposed=seq.spec_proposed, spec_accepted=seq.spec_accepted,
        )
        if match is not None:
            out.stop_chars = match.visible
        if len(seq.output_ids) == 1 and p.prompt_logprobs:
            out.prompt_tokens = self._prompt_tokens(seq)
        if reason is not None:
            if reason is not FinishReason.STOP:
                tail = self.detok.flush(self._decode[seq.request_id], seq.all_ids)
                out.text += tail
            self.scheduler.finish(seq, reason)
            out.finished, out.finish_reason = True, reason
            self._forget(seq)
        return out

    def _prompt_tokens(self, seq: Sequence) -> list[PromptToken]:
        lps = [None] + list(seq.prompt_logprobs)
        return [PromptToken(id=t, text=self.detok.token_text(t), logprob=lps[i] if i < len(lps) else None)
                for i, t in enumerate(seq.prompt_ids)]

    def _finish_output(self, seq: Sequence) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id, finished=True, finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_generated=len(seq.output_ids),
            seed=seq.seed if seq.params.do_sample else None, error=seq.error,
            arrival=seq.arrival, first_scheduled=seq.first_scheduled,
            spec_proposed=seq.spec_proposed, spec_accepted=seq.spec_accepted,
        )
        self._forget(seq)
        return out

    def _forget(self, seq: Sequence) -> None:
        if self.seqs.pop(seq.request_id, None) is not None and needs_host_history(seq.params):
            self._num_host_history -= 1
        self._decode.pop(seq.request_id, None)
        self._stops.pop(seq.request_id, None)
        if self.speculator is not None:
            self.speculator.forget(seq)

    # -- introspection --------------------------------------------------------------------
    def stats(self) -> dict:
        b = self.blocks
        return {
            "kv_blocks_total": b.num_blocks,
            "kv_blocks_used": b.num_used,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_rate": (b.hits / b.queries) if b.queries else 0.0,
            "spec_proposed_tokens": self.speculator.num_proposed if self.speculator else 0,
            "spec_accepted_tokens": self.speculator.num_accepted if self.speculator else 0,
        }


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One output for the tokens of one step: ``a``'s, then ``b``'s (a verify step emits
    several tokens per request; consumers get them in one ``RequestOutput``)."""
    a.tokens += b.tokens
    a.text += b.text
    a.finished, a.finish_reason, a.stop_chars = b.finished, b.finish_reason, b.stop_chars
    a.num_generated = b.num_generated
    if b.prompt_tokens is not None:
        a.prompt_tokens = b.prompt_tokens
    return a
