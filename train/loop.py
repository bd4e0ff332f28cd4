"""The training loop: `train(cfg)` runs (or resumes) one experiment and returns its summary.

    from train.config import load_config
    from train.loop import train
    summary = train(load_config("experiments/quickstart.yaml", ["train.steps=50"]))

Run directory (DESIGN.md): config.yaml, manifest.json, metrics.jsonl, tensorboard/, tokenizer.json,
tokens/, checkpoints/<step>/, samples.txt, summary.json. A run directory that already holds
checkpoints is resumed from the latest one: parameters, optimizer, step, RNG and data order.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import statistics
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from model.attention import check_kernel_platform
from model.transformer import build_model
from sharding.mesh import initialize_distributed, make_mesh
from sharding.pipeline import pipeline_microbatches
from sharding.rules import ShardingError, check_divisible, logical_to_spec, rules_for, unused_mesh_axes
from train import data as data_lib
from model.checkpoint import read_checkpoint_meta
from train.checkpoint import Checkpointer
from train.config import ConfigError, ExperimentConfig
from train.guard import NumericalGuard
from train.metrics import MetricsWriter, peak_flops
from train.optim import learning_rate_schedule, make_optimizer
from train.preemption import PreemptionWatch
from train.run_files import params_sha256, write_json, write_manifest
from train.step import init_train_state, make_eval_step, make_train_step
from train import finetune
from train import lora as train_lora
from train.timeline import Timeline, peak_rss_bytes

log = logging.getLogger(__name__)

# Changing these between a run and its resumption would silently change the experiment.
RESUME_MUST_MATCH = ("model", "data", "optim")


def resolve_vocab(cfg: ExperimentConfig, tokenizer) -> ExperimentConfig:
    """Fill model.vocab_size from the tokenizer (0 = automatic); a smaller explicit size is an error."""
    v = cfg.model.vocab_size
    if v == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    if v < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={v} is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    return cfg


def check_resume_compatible(saved: dict, cfg: ExperimentConfig) -> None:
    new = cfg.to_dict()
    # A key the saved config lacks was added to the schema later: it had its default then.
    defaults = {sec: {f.name: f.default for f in dataclasses.fields(getattr(cfg, sec))} for sec in RESUME_MUST_MATCH}
    diffs = [f"{sec}.{k}: {saved.get(sec, {}).get(k, defaults[sec][k])!r} -> {v!r}"
             for sec in RESUME_MUST_MATCH for k, v in new[sec].items()
             if saved.get(sec, {}).get(k, defaults[sec][k]) != v]
    if diffs:
        raise ConfigError("cannot resume: the run's checkpoint was made with a different config ("
                          + "; ".join(diffs) + "); use a new run.name, or the original settings")


class Trainer:
    """Holds what one run needs; `run()` trains to `cfg.train.steps`. Split from `train()` so tests
    and notebooks can drive the pieces."""

    def __init__(self, cfg: ExperimentConfig, timeline: Timeline | None = None, whole_process: bool = False):
        # where the time goes (timeline.json): `python -m train` passes the process's own, which
        # starts at the process's start; otherwise it starts now
        self.timeline = timeline or Timeline(start=time.time())
        # the run is all this process does (`python -m train`): it may drop JAX's caches (see run)
        self.whole_process = whole_process
        self.timeline.listen_to_jax()
        self.timeline.mark("other")
        with self.timeline.phase("setup"):
            self._init(cfg)

    def _init(self, cfg: ExperimentConfig) -> None:
        try:
            initialize_distributed(cfg.mesh)  # multi-host: before any other JAX call
        except ShardingError as e:
            raise ConfigError(str(e)) from None
        try:  # a kernel the device cannot run is a config error before any work starts
            check_kernel_platform(cfg.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.run_dir = cfg.run.path
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.is_main = jax.process_index() == 0
        self.mesh, self.rules = self.build_mesh(cfg)  # a bad mesh fails here, before any data work
        for name, value in (("model.attention", cfg.model.attention), ("model.matmul", cfg.model.matmul),
                            ("model.norm_impl", cfg.model.norm_impl)):
            if value == "cpu" and self.mesh.size > 1:
                raise ConfigError(f"{name}='cpu' is a one-device kernel, but the mesh has {self.mesh.size} "
                                  f"devices; use {name}='xla' with a mesh")
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                                         async_save=cfg.checkpoint.async_save, keep_every=cfg.checkpoint.keep_every,
                                         min_free_mb=cfg.checkpoint.min_free_mb)
        self.resume_step = self.checkpointer.latest_intact_step()  # torn/corrupt ones are moved aside

        try:
            self._set_up(cfg)
        except BaseException:
            # A user error found from here on (bad data path, ...) is one line: close the manager's
            # threads first, or Orbax logs a traceback from them as the interpreter exits.
            self.checkpointer.close()
            raise

    def _set_up(self, cfg: ExperimentConfig) -> None:
        """Data, config, model, optimizer, steps and iterator; restored from the checkpoint when resuming."""
        with self.timeline.phase("data"):
            # fine-tuning (finetune.init_from): the source's tokenizer encodes the data (train/finetune.py)
            self.source = finetune.load_source(cfg.finetune) if cfg.finetune.init_from else None
            self.data = data_lib.prepare_data(cfg.data, self.run_dir, progress=cfg.train.progress,
                                              **finetune.data_options(cfg, self.source))
        cfg = resolve_vocab(finetune.finetune_config(cfg, self.source, self.data.tokenizer), self.data.tokenizer)
        if self.resume_step is not None:
            _, saved_cfg, _ = read_checkpoint_meta(self.run_dir, self.resume_step)
            check_resume_compatible(saved_cfg, cfg)
        self.cfg = cfg
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            write_manifest(self.run_dir, seed=cfg.train.seed, data_fingerprint=self.data.fingerprint,
                           data_stats=self.data.stats, resumed_from=self.resume_step)

        self.batch_sharding = NamedSharding(self.mesh, logical_to_spec(("batch", "seq"), self.rules))
        with self.timeline.phase("model init"), self.mesh_context():
            try:  # validates every parameter's sharding before the initializer compiles
                model = build_model(cfg.model, seed=cfg.train.seed, mesh=self.mesh, rules=self.rules)
            except ShardingError as e:
                raise ConfigError(f"mesh {dict(self.mesh.shape)} with mesh.rules={cfg.mesh.rules}: {e}") from None
            self.tx = make_optimizer(cfg.optim, cfg.train.steps)
            if train_lora.enabled(cfg.finetune):  # adapters train on the frozen base (train/lora.py)
                self.graphdef, self.state = train_lora.lora_train_state(model, self.tx, cfg.finetune,
                                                                        cfg.train.seed, self.source)
            else:
                self.graphdef, self.state = init_train_state(model, self.tx, cfg.train.seed)
        if self.source is not None and self.resume_step is None and self.state.frozen is None:
            with self.timeline.phase("restore"):  # step 0 of a fine-tuning run: the source's parameters
                self.state = finetune.init_state_from(self.state, self.source)
        self.lr_schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
        self.train_step = make_train_step(self.graphdef, self.tx, self.lr_schedule, cfg.optim.grad_accum,
                                          dropout=cfg.model.dropout > 0,
                                          nonfinite_steps=cfg.train.nonfinite_steps(),
                                          batch_splits=cfg.train.batch_splits)
        self.guard = NumericalGuard(cfg.train.max_nonfinite, cfg.train.spike_factor)
        self.watch = PreemptionWatch()
        self.eval_step = make_eval_step(self.graphdef)
        # Each process reads only its rows of every global batch.
        self.process = dict(process_index=jax.process_index(), process_count=jax.process_count())
        self.train_iter = data_lib.make_train_iterator(self.data, cfg.data, cfg.train.batch_size, cfg.train.seed,
                                                       **self.process)
        if self.resume_step is not None:
            with self.timeline.phase("restore"):
                self.state, data_state = self.checkpointer.restore(self.resume_step, self.state)
                self.train_iter.set_state(data_state)
                self.guard.load_state_dict(self.checkpointer.restore_guard(self.resume_step))
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main)


    @staticmethod
    def build_mesh(cfg: ExperimentConfig):
        """The mesh and rules of `cfg.mesh`, checked against the batch before anything compiles."""
        try:
            mesh, rules = make_mesh(cfg.mesh), rules_for(cfg.mesh.rules)
            micro = cfg.train.batch_size // cfg.optim.grad_accum
            if mesh.shape["stage"] > 1:
                micro //= cfg.mesh.microbatches or 2 * mesh.shape["stage"]
            check_divisible("each (micro)batch", (micro, cfg.data.seq_len), ("batch", "seq"), dict(mesh.shape), rules)
        except ShardingError as e:
            raise ConfigError(str(e)) from None
        unused = unused_mesh_axes(dict(mesh.shape), rules)
        if unused:
            log.warning("mesh.rules=%s does not use mesh axes %s: their devices repeat the same work",
                        cfg.mesh.rules, unused)
        log.info("mesh %s, rules %s", dict(mesh.shape), cfg.mesh.rules)
        return mesh, rules

    def mesh_context(self):
        """Mesh + logical rules active while tracing, so activation constraints resolve."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nnx.logical_axis_rules(self.rules))
        stack.enter_context(pipeline_microbatches(self.cfg.mesh.microbatches))
        return stack

    def to_global(self, local_batch: dict) -> dict:
        """This process's rows -> one global jax.Array per field, sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local_batch.items()}

    def evaluate(self, batches, total: int | None = None, desc: str = "eval") -> float:
        """Exact token-weighted mean loss over `batches`. Every batch is dispatched before any
        result is read, so the host prepares batch k+1 while the device computes batch k; the sums
        are then taken in batch order in float64, as one batch at a time would."""
        show = self.cfg.train.progress and self.is_main
        with self.mesh_context():
            parts = [self.eval_step(self.state.params, self.to_global(batch), self.state.frozen)
                     for batch in tqdm(batches, total=total, desc=desc, leave=False, disable=not show)]
        loss_sum, count = 0.0, 0.0
        for s, n in jax.device_get(parts):
            loss_sum, count = loss_sum + float(s), count + float(n)
        return loss_sum / max(count, 1.0)

    def save(self, step: int, data_state: dict) -> None:
        self.checkpointer.save(step, self.state, data_state, self.cfg.to_dict(), self.data.tokenizer.to_json(),
                               meta=train_lora.checkpoint_meta(self.cfg.finetune, self.source),
                               guard=self.guard.state_dict())
        self.last_saved = step

    def run(self) -> dict:
        cfg, tc = self.cfg, self.cfg.train
        start = int(self.state.step)
        tokens_per_step = tc.batch_size * cfg.data.seq_len
        flops_per_step = cfg.model.flops_per_token(cfg.data.seq_len) * tokens_per_step
        tl = self.timeline
        with tl.phase("peak FLOP/s"):
            peak, peak_source = peak_flops()
        log.info("peak FLOP/s %.3g (%s)", peak, peak_source)
        if self.whole_process:
            # The set-up's ~20 compiled programs (initializers, optimizer state, the FLOP/s matmul)
            # are not called again; dropped now, their ~25 MB of host memory is reused by the train
            # step's program instead of adding to the peak. Not done when the process may run
            # other work that would have to compile them again (tests, notebooks).
            jax.clear_caches()
        heap_watch = None
        if jax.default_backend() == "cpu":
            from sharding.host_memory import HeapWatch, keep_freed_host_memory

            log.info("keep freed host memory (sharding/host_memory.py): %s", keep_freed_host_memory())
            heap_watch = HeapWatch()  # the heap's rare growth does not pile onto its holes
        step_times, compile_time = [], None
        t_start = time.perf_counter()
        pbar = tqdm(total=tc.steps, initial=start, desc="train", disable=not (tc.progress and self.is_main),
                    dynamic_ncols=True)
        self.last_saved = self.resume_step
        self.watch.install()

        if self.source is not None and start == 0:  # the source model on this data: "before fine-tuning"
            with tl.phase("evals"):
                self.init_val_loss = self.evaluate(
                    data_lib.val_batches(self.data, cfg.data, tc.batch_size, **self.process),
                    total=data_lib.num_val_batches(self.data, cfg.data, tc.batch_size), desc="eval before fine-tuning")
            self.metrics.write(0, {"val_loss": self.init_val_loss})
            log.info("validation loss before fine-tuning (whole split): %.4f", self.init_val_loss)
        with tl.phase("steps"), self.mesh_context():  # the first step is its own phase, "compile"
            if start < tc.steps:
                batch = self.to_global(next(self.train_iter))
                data_state = self.train_iter.get_state()  # the iterator's state after `batch` was drawn
            for step in range(start, tc.steps):
                t0 = time.perf_counter()
                if heap_watch is not None and step > start:  # the first step loads its program
                    heap_watch.before_step()
                self.state, metrics = self.train_step(self.state, batch, *self.guard.step_args())
                consumed_state = data_state
                if step + 1 < tc.steps:  # draw the next batch while the device computes this step
                    batch = self.to_global(next(self.train_iter))
                    data_state = self.train_iter.get_state()
                metrics = jax.device_get(metrics)
                if heap_watch is not None:
                    heap_watch()
                self.guard.observe(step + 1, metrics, self.checkpoint_name(self.last_saved))
                dt = time.perf_counter() - t0
                if compile_time is None:
                    compile_time = dt
                    tl.mark("compile")
                else:
                    step_times.append(dt)
                done = step + 1
                pbar.update(1)
                if done % tc.log_every == 0 or done == tc.steps:
                    record = {k: float(v) for k, v in metrics.items()}
                    record.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                                  mfu=flops_per_step / dt / peak)
                    if tc.eval_every and done % tc.eval_every == 0:
                        with tl.phase("evals"):
                            record["val_loss"] = self.evaluate(itertools.islice(
                                data_lib.eval_sample_iterator(self.data, cfg.data, tc.batch_size, seed=tc.seed,
                                                              **self.process), tc.eval_batches),
                                total=tc.eval_batches, desc="val estimate")
                    self.metrics.write(done, record)
                    pbar.set_postfix(loss=f"{record['loss']:.4f}", **(
                        {"val": f"{record['val_loss']:.4f}"} if "val_loss" in record else {}))
                if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < tc.steps:
                    with tl.phase("checkpoint saves"):
                        self.save(done, consumed_state)
                if done < tc.steps and self.watch.should_stop(done):
                    return self.stop_for_preemption(done, consumed_state, pbar)
        pbar.close()
        train_time = time.perf_counter() - t_start
        if heap_watch is not None:
            heap_watch.trim()  # the steps' holes, before evaluation and sampling allocate their own
            log.info("heap: %d trims; waited for a step's temporaries to be freed after %d steps (%.2f s, "
                     "%d timeouts)", heap_watch.trims, heap_watch.waits, heap_watch.waited_s, heap_watch.timeouts)

        # The final checkpoint is written in the background while the final evaluation and the
        # samples run (nothing changes the state any more); then wait for it.
        if start < tc.steps:
            with tl.phase("checkpoint saves"):
                self.save(tc.steps, consumed_state)
        with tl.phase("final eval"):
            final_loss = self.evaluate(data_lib.val_batches(self.data, cfg.data, tc.batch_size, **self.process),
                                       total=data_lib.num_val_batches(self.data, cfg.data, tc.batch_size),
                                       desc="final eval (whole validation split)")
        if self.is_main and tc.sample_tokens:
            with tl.phase("samples"):
                self.write_samples()
        with tl.phase("checkpoint wait"):
            self.checkpointer.wait()
        tl.mark("summary")
        median = statistics.median(step_times) if step_times else float("nan")
        summary = {
            "step": tc.steps,
            "val_loss": final_loss,
            "wall_time_s": time.perf_counter() - t_start,
            "train_time_s": train_time,
            "compile_time_s": compile_time,
            "median_step_time_s": median,
            "tokens_per_s": tokens_per_step / median if step_times else None,
            "mfu": flops_per_step / median / peak if step_times else None,
            "peak_flops": peak,
            "peak_flops_source": peak_source,
            "resumed_from_step": self.resume_step,
            "params_sha256": params_sha256(self.state.params),
            "nonfinite_steps": self.guard.nonfinite_total,
            "spike_steps": self.guard.spikes_total,
            "peak_rss_bytes": peak_rss_bytes(),  # so far; timeline.json has the whole command's
            "init_val_loss": getattr(self, "init_val_loss", None),  # fine-tuning: val_loss at step 0
        }
        if self.is_main:
            self.metrics.write(tc.steps, {"val_loss": final_loss, "final": True})
            write_json(self.run_dir / "summary.json", summary)
        tl.mark("summary")
        return summary

    def checkpoint_name(self, step: int | None) -> str:
        return "none (no checkpoint yet)" if step is None else str(self.checkpointer.directory / str(step))

    def stop_for_preemption(self, done: int, data_state: dict, pbar) -> dict:
        """Save step `done` (unless just saved), wait until it is on disk, and report."""
        pbar.close()
        if self.last_saved != done:
            self.save(done, data_state)
        self.checkpointer.wait()
        log.warning("%s received: saved checkpoint %s; resume with the same command",
                    self.watch.signal_name, self.checkpoint_name(done))
        return {"step": done, "preempted": True, "signal": self.watch.signal_name,
                "checkpoint": self.checkpoint_name(done), "resumed_from_step": self.resume_step}

    def write_samples(self, n: int = 3) -> None:
        from infer.sampler import generate_text
        from model.transformer import with_kernels

        cfg = self.cfg
        # the sampler's KV-cache path has only the jnp attention; the parameters are the same
        model = with_kernels(train_lora.trained_model(self.graphdef, self.state), "xla", cfg.model.matmul,
                             cfg.model.norm_impl)
        if finetune.is_chat(cfg):  # answers to a user turn, in the chat template
            return finetune.write_chat_samples(model, self.data.tokenizer, self.run_dir / "samples.txt",
                                               cfg.train.sample_prompt, cfg.train.sample_tokens, cfg.train.seed, n)
        prompt = cfg.train.sample_prompt or self.data.tokenizer.decode(self.data.val.read(0, 16))
        texts = generate_text(model, self.data.tokenizer, [prompt] * n, max_new_tokens=cfg.train.sample_tokens,
                              temperature=0.8, top_k=0, seed=cfg.train.seed)
        sep = "\n" + "=" * 72 + "\n"
        (self.run_dir / "samples.txt").write_text(sep.join(prompt + t for t in texts) + "\n")

    def close(self) -> None:
        self.watch.uninstall()
        self.checkpointer.close()
        self.metrics.close()


def train(cfg: ExperimentConfig, timeline: Timeline | None = None, whole_process: bool = False) -> dict:
    """Train (or resume) the experiment `cfg` and return its summary (also in summary.json); where
    the time went is in <run>/timeline.json (`timeline`: the process's, from `python -m train`;
    `whole_process`: nothing else runs in this process, see Trainer.run)."""
    trainer = Trainer(cfg, timeline, whole_process)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if trainer.is_main:
        trainer.timeline.finish(cfg.run.path, "close")
    if summary.get("preempted"):  # the checkpoint is written and closed: the process may exit now
        summary["signal_to_exit_s"] = trainer.watch.seconds_since_signal()
    return summary
