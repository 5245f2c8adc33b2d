"""Planted-bug pass (mutation testing by hand): plant one realistic bug at a time in a scratch copy of the repo and
run the tests that should catch it. Not part of the suite (it is slow, and not named test_*).

    python tests/plant_bugs.py                         # every bug, one scratch copy
    python tests/plant_bugs.py --list                  # the table, nothing run
    python tests/plant_bugs.py --check                 # only that every snippet is still found exactly once
    python tests/plant_bugs.py dataloader shards       # the bugs of these modules
    python tests/plant_bugs.py --bug dataloader-window-order-fixed --jobs 2 --baseline   # modules and --bug add up

A bug is (module, original snippet, mutated snippet, test files, description). The original snippet must occur
exactly once in the module as it is now: otherwise the script stops and names it, so the table stays honest as the
code changes (update the snippet, do not delete the bug). A bug is "caught" when `python -m pytest -x -q` over its
test files fails with it planted (or runs past --timeout), "survived" when they pass, "error" when pytest could not
run them (a test named in the table no longer exists). --baseline first runs each distinct set of test files
unmutated (they must pass, or "caught" means nothing). Exit status: 1 when a bug survived or a baseline failed.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

REPO = Path(__file__).resolve().parent.parent
EXCLUDE = {".venv", ".git", "__pycache__", ".pytest_cache", ".benchmarks", "temp_data", ".ipynb_checkpoints"}


@dataclass(frozen=True)
class Bug:
    name: str  # "<module>-<what>", unique
    module: str  # file relative to the repo root
    original: str
    mutated: str
    tests: tuple[str, ...]  # pytest arguments: files or node ids (tests/test_x.py::test_y)
    description: str


def bug(name, module, original, mutated, tests, description) -> Bug:
    return Bug(name, module, original, mutated, tuple(tests.split()), description)


DL, SH, DP, FA = "tests/test_dataloader.py", "tests/test_shards.py", "tests/test_data_prep.py", "tests/test_faults.py"
FSDP_UNITS = ("tests/test_fsdp.py::test_fsdp_on_two_processes_clips_and_steps_like_one_process_accumulating "
              "tests/test_fsdp.py::test_sharded_checkpoint_reloads_exactly_into_fsdp_and_plain_models_and_a_pt_into_fsdp "
              "tests/test_fsdp.py::test_fsdp_holds_half_the_parameter_and_optimizer_bytes_per_process "
              "tests/test_checkpoint.py::test_single_process_readers_get_the_full_model_without_a_process_group")
CK_SHARDED_DAMAGED = "tests/test_checkpoint.py::test_damaged_sharded_checkpoint_is_one_line_and_a_resume_falls_back"
CK_LISTING = "tests/test_checkpoint.py::test_listing_pruning_and_setting_aside_treat_folders_like_files"
CK_DAMAGED = "tests/test_checkpoint.py::test_only_a_damaged_file_is_skipped_or_set_aside"
FA_ATOMIC = "tests/test_faults.py::test_atomic_write_names_the_path_and_its_cleanup_never_raises_twice"
FA_METRICS = "tests/test_faults.py::test_unusable_metrics_lines_are_skipped_with_their_numbers"
FA_BUG_TB = "tests/test_faults.py::test_a_bug_while_handling_a_file_error_keeps_its_traceback"
TRACKED = ("tests/test_tracking.py::test_tensorboard_holds_the_metrics_jsonl_events "
           "tests/test_tracking.py::test_resumed_run_continues_tensorboard_without_repeating_steps "
           "tests/test_tracking.py::test_wandb_offline_run_holds_the_metrics_jsonl_events "
           "tests/test_tracking.py::test_resumed_run_continues_the_same_wandb_run")
HS_UNITS = ("tests/test_hellaswag.py::test_batched_scorer_matches_one_ending_at_a_time "
            "tests/test_hellaswag.py::test_eval_restores_mode_and_draws_no_random_numbers "
            "tests/test_hellaswag.py::test_malformed_line_names_file_and_line "
            "tests/test_hellaswag.py::test_download_checks_count_and_renames")
HS_RANKS = "tests/test_hellaswag.py::test_cli_two_gloo_ranks_count_like_one_process"
GEN_UNITS = ("tests/test_generate.py::test_greedy_equals_argmax_decoding_without_cache "
             "tests/test_generate.py::test_same_seed_same_text_and_no_side_effects "
             "tests/test_generate.py::test_evaluating_restores_the_mode_after_an_error "
             "tests/test_generate.py::test_sampling_settings_are_refused_naming_the_callers_flag "
             "tests/test_generate.py::test_stop_at_eot_ends_the_text_before_endoftext "
             "tests/test_generate.py::test_token_printer_joins_characters_split_over_tokens "
             "tests/test_generate.py::test_a_prompt_of_exactly_the_context_is_accepted_one_more_token_is_not "
             "tests/test_generate.py::test_prompts_share_one_generator_drawing_on_from_the_previous_prompt")
EHF = "tests/test_export_hf.py"
EHF_UNITS = ("tests/test_export_hf.py::test_debug_preset_matches_transformers_and_round_trips "
             "tests/test_export_hf.py::test_padded_vocab_rows_dropped_on_export_restored_on_import "
             "tests/test_export_hf.py::test_cli_export_then_import_gives_a_loadable_checkpoint "
             "tests/test_export_hf.py::test_model_card_without_metrics_says_not_available "
             "tests/test_export_hf.py::test_failed_export_leaves_no_output "
             "tests/test_export_hf.py::test_force_replaces_an_earlier_export")
PM = "tests/test_plot_metrics.py tests/test_metrics_jsonl.py"

BUGS = [
    # dataloader.py ------------------------------------------------------------------------------------------------
    bug("dataloader-window-order-fixed", "dataloader.py",
        "np.random.default_rng([seed, 1, epoch, shard])", "np.random.default_rng([seed, 1, shard])", DL,
        "the window order inside a shard is the same every epoch (issue #24)"),
    bug("dataloader-rank-offset", "dataloader.py",
        "self._read(self._window + self.rank * self.batch_size, self.batch_size)",
        "self._read(self._window, self.batch_size)", DL, "every rank reads rank 0's windows"),
    bug("dataloader-last-window-overruns", "dataloader.py",
        "max(s.tokens - 1, 0) // seq_len for s in shards", "max(s.tokens, 0) // seq_len for s in shards", DL,
        "a shard's last window needs one token more than the shard holds (T+1 tokens per window)"),
    bug("dataloader-position-not-restored", "dataloader.py",
        "        self._window = window\n", "        self._window = 0\n", DL,
        "load_state_dict checks the saved position but starts the stream from 0"),
    bug("dataloader-settings-not-checked", "dataloader.py",
        "            if state.get(key) != value:", "            if key != \"seed\" and state.get(key) != value:", DL,
        "a resume under another seed is accepted (the stream silently changes)"),
    bug("dataloader-epoch-seen-not-restored", "dataloader.py",
        "        self._epoch_seen = self._locate(window - stride + (self.rank + 1) * self.batch_size - 1)[0] \\\n"
        "            if window >= stride else 0\n", "        self._epoch_seen = 0\n", DL,
        "a loader resumed in a later epoch logs the crossings it had already logged"),
    bug("dataloader-v1-position", "dataloader.py",
        'state["micro_batch"] * state["world_size"] * state["batch_size"]', 'state["micro_batch"] * state["batch_size"]',
        DL, "a v1 (per-rank) loader state of a multi-process run resumes at the wrong window"),
    bug("dataloader-val-from-start", "dataloader.py",
        "chosen = np.arange(used, dtype=np.int64) * total // used",
        "chosen = np.arange(used, dtype=np.int64)", DL,
        "validation with a token limit reads the split's first windows instead of windows spread over it"),
    bug("dataloader-val-rank", "dataloader.py",
        "lo = (i * world_size + rank) * batch_size", "lo = (i * world_size) * batch_size", DL,
        "every rank evaluates rank 0's validation windows"),
    bug("dataloader-shard-order-fixed", "dataloader.py", "np.random.default_rng([seed, 0, epoch]).permutation(n_shards)",
        "np.random.default_rng([seed, 0]).permutation(n_shards)", DL, "the shard order is the same every epoch"),
    bug("dataloader-batch-fit-off-by-one", "dataloader.py", "    if batch_size > held:",
        "    if batch_size > held + 1:", DL,
        "a micro-batch one window larger than the largest train shard holds is accepted"),
    # shards.py -----------------------------------------------------------------------------------------------------
    bug("shards-written-in-place", "shards.py",
        "    with atomic_write(path) as f:\n", "    with open(path, \"wb\") as f:\n", SH,
        "a shard written under its final name (no temporary file, no rename) (issue #24)"),
    bug("shards-size-check-one-sided", "shards.py", "    if size != expected:", "    if size < expected:",
        DL + " " + SH, "a shard longer than its header promises (trailing bytes) is accepted"),
    bug("shards-manifest-count-unchecked", "shards.py", '        if count != entry["tokens"]:',
        '        if count > entry["tokens"]:', DL, "a shard with fewer tokens than the manifest lists is accepted"),
    bug("shards-tokenizer-unchecked", "shards.py",
        'if manifest.get("tokenizer_sha256") != tokenizer.RANKS_SHA256:',
        'if manifest.get("tokenizer_sha256") not in (tokenizer.RANKS_SHA256, None):', DL + " " + SH,
        "a manifest without a tokenizer hash is accepted"),
    bug("shards-path-escape", "shards.py",
        """entry["split"] not in splits or Path(entry["file"]).name != entry["file"]""",
        """entry["split"] not in splits""", DL + " " + SH,
        "a manifest entry naming a file outside the data directory (../x.bin) is followed"),
    bug("shards-sha-not-verified", "shards.py",
        '        if verify_sha256 and file_sha256(path) != entry["sha256"]:',
        '        if verify_sha256 and file_sha256(path) == entry["sha256"][:0]:', DL + " " + SH,
        "verify_sha256 reads the file but never compares the hash"),
    bug("shards-empty-split-accepted", "shards.py", "        if not shards:\n", "        if shards is None:\n",
        DL + " " + SH, "a manifest with no val (or no train) shard is accepted"),
    bug("shards-version-unchecked", "shards.py",
        "if magic != SHARD_MAGIC or version != SHARD_VERSION or dtype_code not in DTYPE_CODES:",
        "if magic != SHARD_MAGIC or dtype_code not in DTYPE_CODES:", DL + " " + SH,
        "a shard of another format version is read as this one"),
    bug("shards-entry-tokens-any-int", "shards.py", 'type(entry.get("tokens")) is int and entry["tokens"] >= 0',
        'isinstance(entry.get("tokens"), int)', DL + " " + SH,
        "a manifest entry of true or -1 tokens passes as a shard entry"),
    # checkpoint.py ---------------------------------------------------------------------------------------------------
    bug("checkpoint-set-aside-overwrites", "checkpoint.py", "        while new.exists():", "        if new.exists():",
        CK_DAMAGED + " tests/test_checkpoint.py::test_setting_aside_the_same_name_three_times_keeps_every_copy",
        "a third checkpoint set aside under one name overwrites an earlier copy "
        "(issue #24)"),
    bug("checkpoint-prune-off-by-one", "checkpoint.py", "older[:max(0, len(older) - (keep - 1))]",
        "older[:max(0, len(older) - keep)]", CK_LISTING + " tests/test_checkpoint.py::"
        "test_pruning_keeps_the_checkpoint_just_saved_and_newer_ones", "pruning keeps one checkpoint too many"),
    bug("checkpoint-prune-newer-too", "checkpoint.py",
        "older = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) < checkpoint_step(saved)]",
        "older = [p for p in list_checkpoints(run_dir) if p != saved]", CK_LISTING + " tests/test_checkpoint.py::"
        "test_pruning_keeps_the_checkpoint_just_saved_and_newer_ones",
        "pruning counts checkpoints newer than the one just saved (it can delete the one just saved's elders wrongly "
        "or keep newer damaged ones)"),
    bug("checkpoint-newest-is-oldest", "checkpoint.py", "for candidate in reversed(list_checkpoints(run_dir)):",
        "for candidate in list_checkpoints(run_dir):", CK_DAMAGED, "a resume picks the oldest valid checkpoint"),
    bug("checkpoint-oom-is-damage", "checkpoint.py",
        "        return any(message in str(error) for message in DAMAGE_MESSAGES)", "        return True",
        CK_DAMAGED, "running out of memory while loading counts as a damaged file (a resume falls back)"),
    bug("checkpoint-shard-size-wrong-end", "checkpoint.py",
        "max(entry.offset + entry.length for entry in items)", "max(entry.offset for entry in items)",
        CK_SHARDED_DAMAGED,
        "a sharded checkpoint's size check uses where its last entry starts, not where it ends"),
    bug("checkpoint-rope-not-reset", "checkpoint.py", "    model.reset_rope_tables()\n    return model.eval()",
        "    return model.eval()", "tests/test_generate.py::test_cli_greedy_text_equals_plain_argmax_decoding",
        "a model built on the meta device keeps uninitialized RoPE tables"),
    bug("checkpoint-torch-rng-not-restored", "checkpoint.py", '    torch.set_rng_state(state["torch"])\n', "",
        "tests/test_train.py::test_stop_and_resume_is_exact", "the torch RNG (dropout) is not restored on resume"),
    # sharding.py -----------------------------------------------------------------------------------------------------
    bug("sharding-root-only", "sharding.py",
        "    for block in model.blocks:\n        fully_shard(block, mp_policy=policy)\n", "",
        "tests/test_sharding.py", "FSDP wraps only the root: every forward gathers the whole model (issue #24)"),
    bug("sharding-bytes-of-whole-params", "sharding.py",
        "return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)",
        "return sum(t.nbytes for t in tensors)", FSDP_UNITS,
        "the bytes a process holds are counted from the whole (unsharded) parameters"),
    # checkpoint.py: the sharded save and the load into any layout (moved there from sharding.py) ------------------
    bug("checkpoint-pt-moments-dropped", "checkpoint.py",
        'return {name: saved["state"][i] for name, i in zip(flat_names, positions) if i in saved["state"]}',
        "return {}", FSDP_UNITS, "a .pt checkpoint's AdamW moments are not loaded under FSDP"),
    bug("checkpoint-pt-moments-shifted", "checkpoint.py",
        "positions = [i for g in saved[\"param_groups\"] for i in g[\"params\"]]",
        "positions = sorted(i for g in saved[\"param_groups\"] for i in g[\"params\"])[::-1]", FSDP_UNITS,
        "a .pt checkpoint's moments are matched to parameters in reverse order"),
    bug("checkpoint-save-in-place", "checkpoint.py",
        'tmp = path.with_name(f".{path.name}.tmp{_rank0_value(os.getpid(), group)}")',
        "tmp = path; _rank0_value(os.getpid(), group)",
        "tests/test_fsdp.py::test_kill_during_a_sharded_save_leaves_the_previous_checkpoint_for_resume",
        "a sharded checkpoint is written under its final name (a kill leaves a damaged step folder)"),
    bug("checkpoint-pt-not-full", "checkpoint.py",
        "        options = StateDictOptions(full_state_dict=True)  # full tensors: each process keeps its slice",
        "        options = StateDictOptions()", FSDP_UNITS,
        "a .pt checkpoint's full tensors are loaded into FSDP as if they were this process's shards"),
    # data_prep.py ----------------------------------------------------------------------------------------------------
    bug("data_prep-max-tokens-off-by-one", "data_prep.py", "piece = piece[:args.max_tokens - tokens]",
        "piece = piece[:args.max_tokens - tokens - 1]", "tests/test_data_prep.py::test_max_docs_and_max_tokens_slice_the_stream",
        "--max-tokens drops a token at the cut"),
    bug("data_prep-shard-numbering", "shards.py", 'name = f"{self.split}_{self.counts[self.split]:06d}.bin"',
        'name = f"{self.split}_{self.counts[self.split] + 1:06d}.bin"', DP,
        "shard files are numbered from 1"),
    bug("data_prep-old-manifest-kept-while-publishing", "data_prep.py",
        "(out / shards.MANIFEST_NAME).unlink(missing_ok=True)", "None",
        "tests/test_data_prep.py::test_a_crash_in_an_overwrite_never_leaves_a_manifest_of_other_shards",
        "--overwrite moves the new shards in under the old manifest: a crash then leaves a manifest of other shards"),
    bug("data_prep-build-written-into-out", "data_prep.py", "result = tokenize_and_write(texts, staging, args)",
        "result = tokenize_and_write(texts, out, args)",
        "tests/test_data_prep.py::test_a_build_that_fails_or_stops_leaves_out_as_it_was",
        "shards are written straight into --out: a build that fails part way replaces the finished dataset"),
    bug("data_prep-staging-foreign-files-unchecked", "data_prep.py", " + foreign_files(staging)", "",
        "tests/test_data_prep.py::test_a_killed_builds_staging_folder_is_no_content_of_out",
        "a staging folder holding a user's file is not refused up front"),
    bug("data_prep-reuse-without-hash", "data_prep.py", "shards.validate_shards(out, manifest, verify_sha256=True)",
        "shards.validate_shards(out, manifest, verify_sha256=False)",
        "tests/test_data_prep.py::test_damaged_finished_output_is_refused_until_overwrite",
        "a finished build whose shard bytes changed (same size) is reused"),
    bug("data_prep-overwrite-removes-foreign", "data_prep.py", "    if foreign:\n", "    if foreign and not overwrite:\n",
        "tests/test_data_prep.py::test_directory_holding_other_files_is_refused",
        "--overwrite deletes files data_prep.py did not write"),
    bug("data_prep-tiny-train-split-accepted", "data_prep.py",
        "return train >= MIN_SPLIT_TOKENS and (val", "return train >= 0 and (val",
        "tests/test_data_prep.py::test_bad_inputs_are_one_clear_error "
        "tests/test_data_prep.py::test_a_build_that_fails_or_stops_leaves_out_as_it_was",
        "a build whose tokens all (or all but a few) went to validation is written"),
    bug("data_prep-tiny-val-split-accepted", "data_prep.py",
        "(val >= MIN_SPLIT_TOKENS or not args.val_share)", "(val >= 0 or not args.val_share)",
        "tests/test_data_prep.py::test_a_build_that_fails_or_stops_leaves_out_as_it_was",
        "a tiny corpus builds a validation split of a few tokens, shorter than any context"),
    bug("data_prep-shrunk-val-wrong-share", "shards.py", "max(1, int(tokens.size * self.val_share))",
        "max(1, int(tokens.size * (1 - self.val_share)))",
        "tests/test_data_prep.py::test_small_stream_shrinks_validation_at_its_end",
        "a corpus smaller than --val-tokens gives validation the complement of --val-share"),
    bug("data_prep-input-versions-unrecorded", "data_sources.py",
        '"file_versions": [file_version(f) for f in files]', '"file_versions": []',
        "tests/test_data_prep.py::test_a_rerun_after_a_local_input_changed_is_not_nothing_to_do",
        "a rerun after a --files input changed reuses the dataset built from the old version"),
    bug("data_prep-file-matched-twice-accepted", "data_sources.py", "            if first is not None:  # (by two",
        "            if False:  # (by two", "tests/test_data_prep.py::test_the_same_file_matched_twice_is_refused",
        "a file matched by two --files patterns is tokenized twice, into both splits"),
    bug("shards-entry-listed-twice-accepted", "shards.py",
        'if entry["file"] in listed or not entry["file"].startswith', 'if False and not entry["file"].startswith',
        "tests/test_shards.py::test_a_manifest_listing_a_shard_twice_or_under_the_other_split_is_refused",
        "a manifest listing one shard twice trains on it twice as often"),
    bug("shards-split-prefix-unchecked", "shards.py", 'startswith(f"{entry[\'split\']}_")',
        'startswith("")', "tests/test_shards.py::test_a_manifest_listing_a_shard_twice_or_under_the_other_split_is_refused",
        "a manifest listing the val shard as a train shard trains on validation data"),
    bug("data_prep-bad-row-numbered-within-its-task", "data_prep.py", "row {first_row + e.row + 1} of the input",
        "row {e.row + 1} of the input",
        "tests/test_data_prep.py::test_a_row_that_holds_no_text_is_named_by_its_number",
        "a row that holds no text is numbered within its pool task, not the input"),
    bug("data_prep-live-build-disturbed", "data_prep.py", "    if pid is not None:\n        raise UserError(f\"--out {out} is being built",
        "    if False:\n        raise UserError(f\"--out {out} is being built",
        "tests/test_data_prep.py::test_a_build_under_way_in_out_is_not_disturbed",
        "a second data_prep.py on the same --out removes the staging folder a live build writes into"),
    bug("data_prep-ctrl-c-mid-publish", "data_prep.py", "    with signals_deferred():  # Ctrl-C takes effect",
        "    with contextlib.nullcontext():  # Ctrl-C takes effect",
        "tests/test_data_prep.py::test_ctrl_c_while_publishing_waits_for_the_whole_build",
        "Ctrl-C between two renames of --overwrite's publishing leaves a mix of old and new shards"),
    bug("data_prep-mixed-text-types-stored-as-json", "data_sources.py",
        'strict = {"on_mixed_types": None} if json_refuses_mixed_types() else {}', "strict = {}",
        "tests/test_data_prep.py::test_a_non_text_row_in_a_later_jsonl_file_is_named_not_tokenized_as_json",
        "a number among a jsonl file's texts makes datasets store the file's texts as JSON, tokenized with quotes"),
    # trackers.py -----------------------------------------------------------------------------------------------------
    bug("trackers-fresh-run-continues-wandb", "trackers.py",
        "run_id = id_file.read_text().strip() if resumed and id_file.exists() else secrets.token_hex(6)",
        "run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)",
        "tests/test_tracking.py::test_a_fresh_start_in_an_old_run_directory_is_a_new_wandb_run",
        "a fresh run in an old run directory continues the old W&B run (issue #24)"),
    bug("trackers-no-purge", "trackers.py", "SummaryWriter(str(run_dir), purge_step=start_step, flush_secs=30)",
        "SummaryWriter(str(run_dir), flush_secs=30)", TRACKED,
        "a resumed run's TensorBoard shows the steps it ran again twice"),
    bug("trackers-start-step-evals", "trackers.py", '            if event["step"] == start_step:',
        '            if event["step"] < start_step:', TRACKED,
        "a resume re-logs every earlier event instead of the start step's evaluations"),
    bug("trackers-failed-tracker-kept", "trackers.py", "            self.active.remove(tracker)\n", "",
        "tests/test_tracking.py::test_a_failing_tracker_warns_once_and_training_goes_on",
        "a failing tracker stays active and warns on every event"),
    bug("trackers-failure-exit-code", "trackers.py", "self.close(exit_code=0 if exc_type is None else 1)",
        "self.close(exit_code=0)",
        "tests/test_tracking.py::test_trackers_close_with_exit_code_1_when_an_exception_ends_the_run",
        "a run ended by an exception is marked finished (exit code 0) in W&B"),
    bug("trackers-duplicates-kept", "trackers.py", "    return list(dict.fromkeys(names))", "    return names",
        "tests/test_tracking.py::test_unknown_tracker_refused", "--tracker tensorboard,tensorboard opens two writers"),
    # hellaswag_eval.py -----------------------------------------------------------------------------------------------
    bug("hellaswag-crop-wrong-end", "hellaswag_eval.py", "rows.append((ctx[-room:] + completion, len(completion)))",
        "rows.append((ctx[:room] + completion, len(completion)))", HS_UNITS,
        "a context too long for the model keeps its oldest tokens instead of its newest"),
    bug("hellaswag-target-off-by-one", "hellaswag_eval.py",
        "targets[r, length - n_completion:length] = torch.tensor(tokens[-n_completion:])",
        "targets[r, length - n_completion + 1:length] = torch.tensor(tokens[-n_completion + 1:])", HS_UNITS,
        "the first completion token is not scored"),
    bug("hellaswag-norm-is-sum", "hellaswag_eval.py", "correct_norm = int(((sums / counts).argmax(1) == labels).sum())",
        "correct_norm = int((sums.argmax(1) == labels).sum())", HS_UNITS + " " + HS_RANKS,
        "acc_norm counts the sum of log-probs, not the mean per token"),
    bug("hellaswag-rank-split", "hellaswag_eval.py", "    mine = examples[rank::world_size]",
        "    mine = examples[rank * (len(examples) // world_size):]", HS_RANKS,
        "ranks' example slices overlap (the last rank's to the end)"),
    bug("hellaswag-no-all-reduce", "hellaswag_eval.py", "        dist.all_reduce(totals)\n", "        pass\n", HS_RANKS,
        "each rank reports only its own counts"),
    bug("hellaswag-download-unchecked", "hellaswag_eval.py",
        "        _check_official(read_examples(tmp), dest, expected)\n", "        read_examples(tmp)\n", HS_UNITS,
        "a download of the wrong size is cached as the official split"),
    bug("hellaswag-label-range", "hellaswag_eval.py", "not 0 <= label < N_ENDINGS:", "not 0 <= label <= N_ENDINGS:",
        HS_UNITS, "a label of 4 (no such ending) is accepted"),
    # generate.py -----------------------------------------------------------------------------------------------------
    bug("generate-eot-kept", "generate.py", "new_ids = new_ids[:new_ids.index(EOT_ID)]",
        "new_ids = new_ids[:new_ids.index(EOT_ID) + 1]", GEN_UNITS, "the text ends after <|endoftext|>, not before"),
    bug("generate-printer-resumes", "generate.py",
        "self.stopped = self.stopped or (self.stop_at_eot and token == EOT_ID)",
        "self.stopped = self.stop_at_eot and token == EOT_ID", GEN_UNITS,
        "the streamed text goes on after <|endoftext|>"),
    bug("generate-prompt-at-context-refused", "generate.py", "    if len(ids) > block_size:", "    if len(ids) >= block_size:",
        GEN_UNITS + " tests/test_generate.py::test_cli_bad_input_is_one_line",
        "a prompt of exactly the model's context is refused"),
    bug("generate-mode-not-restored", "generate.py",
        '    with evaluating(model), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):',
        '    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):', GEN_UNITS,
        "generate_samples samples in training mode (dropout on)"),
    bug("generate-one-generator-per-prompt", "generate.py",
        "        return [sample_continuations(model, ids, 1, sampling, generator, stop_at_eot, compile=False)[0]",
        "        return [sample_continuations(model, ids, 1, sampling, torch.Generator(device=device).manual_seed(seed), "
        "stop_at_eot, compile=False)[0]", GEN_UNITS, "every prompt restarts the sampling generator"),
    bug("generate-stream-rows", "generate.py", "    stream = len(prompts) == 1 and args.num_samples == 1",
        "    stream = len(prompts) == 1", "tests/test_generate.py",
        "several samples of one prompt are streamed (only row 0 printed)"),
    # devices.py ------------------------------------------------------------------------------------------------------
    bug("devices-mean-is-sum", "devices.py", "        return value / self.world_size\n", "        return value\n",
        "tests/test_devices.py", "Dist.mean returns the sum over ranks"),
    bug("devices-mean-in-place", "devices.py", "        value = value.clone()\n", "", "tests/test_devices.py",
        "Dist.mean sums into the caller's tensor (a logged loss changes under it)"),
    bug("devices-any-is-all", "devices.py", "dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)",
        "dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.control)", "tests/test_devices.py",
        "Dist.any is true only when every rank's flag is"),
    bug("devices-peak-order", "devices.py", "sorted(PEAK_BF16_FLOPS, key=len, reverse=True)",
        "sorted(PEAK_BF16_FLOPS, key=len)", "tests/test_model.py::test_mfu_peaks",
        "an H100 PCIe is taken for an H100 SXM"),
    bug("devices-largest-fitting-wrong-end", "devices.py",
        "next((batch for batch in candidates if fits(batch)), 0)",
        "next((batch for batch in reversed(candidates) if fits(batch)), 0)",
        "tests/test_train.py::test_micro_batch_auto_picks_largest_fitting_divisor",
        "--micro-batch auto picks the smallest fitting micro-batch"),
    bug("devices-probe-one-pass", "devices.py", "            for _ in range(2):\n", "            for _ in range(1):\n",
        "tests/test_train.py::test_memory_probe_runs_two_accumulating_passes_and_leaves_the_model_untouched",
        "the memory probe runs one pass, not two (accumulated gradients not held)"),
    bug("devices-probe-grads-kept", "devices.py", "            model.zero_grad(set_to_none=True)\n", "",
        "tests/test_train.py::test_memory_probe_runs_two_accumulating_passes_and_leaves_the_model_untouched",
        "the memory probe leaves its gradients in the model"),
    bug("devices-cuda-local-rank", "devices.py", 'torch.device("cuda", local_rank) if kind == "cuda"',
        'torch.device("cuda", 0) if kind == "cuda"', "tests/test_devices.py",
        "under torchrun every process of a node takes GPU 0"),
    bug("devices-restart-prefix", "devices.py",
        "f\"lf-llm/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}\"", "\"lf-llm/attempt0\"",
        "tests/test_devices.py", "a restarted worker group shares the dead group's store keys"),
    # cli.py ----------------------------------------------------------------------------------------------------------
    bug("cli-temp-file-kept", "cli.py", "            tmp.unlink(missing_ok=True)\n", "            pass\n",
        FA_ATOMIC + " " + SH, "a failed atomic write leaves its temporary file"),
    bug("cli-rename-before-flush", "cli.py", "            yield f\n            f.flush()\n", "            yield f\n",
        "tests/test_cli.py", "atomic_write fsyncs before flushing Python's buffer (a crash can lose the tail)"),
    bug("train-out-writability-unchecked", "config.py", 'check_writable_dir(cfg.out or DEFAULT_RUNS_DIR, "--out")',
        "None", "tests/test_faults.py::test_unwritable_outputs_are_one_line_before_work",
        "an --out no file can be written in is found only when rank 0 makes it (--check passes it; rank 1 a traceback)"),
    bug("train-run-dir-unlocked", "cli.py", "        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)\n",
        "        pass\n", "tests/test_faults.py::test_a_run_directory_in_use_is_refused_by_the_run_and_check_then_"
        "free_once_released", "two train.py runs write into one run directory at once"),
    bug("train-final-checkpoint-after-evaluations", "train.py", "        if saving and final:\n",
        "        if False:\n",
        "tests/test_faults.py::test_a_final_evaluation_that_fails_loses_no_training_and_a_resume_runs_what_is_missing",
        "the last step's checkpoint is saved after its evaluations: one failing there loses the whole run"),
    bug("train-missing-final-evaluations-skipped", "train.py", "finished=not self.final_missing)", "finished=True)",
        "tests/test_faults.py::test_a_final_evaluation_that_fails_loses_no_training_and_a_resume_runs_what_is_missing",
        "a resume at the last step says 'nothing to train' though the last step's evaluations never ran"),
    bug("train-unreadable-metrics-lines-dropped", "trackers.py", "            unreadable.append((number, problem))\n",
        "            continue\n", "tests/test_faults.py::test_resume_over_a_damaged_metrics_file_keeps_the_lines_it_"
        "cannot_read", "a resume deletes the metrics.jsonl lines it cannot read"),
    bug("cli-error-on-every-rank", "cli.py", '    if os.environ.get("LOCAL_RANK", "0") == "0":', "    if True:",
        "tests/test_cli.py", "under torchrun every process prints the same error line"),
    bug("cli-positive-int-zero", "cli.py", "    if value < 1:\n", "    if value < 0:\n", "tests/test_cli.py",
        "a positive-integer flag accepts 0"),
    bug("cli-finite-float-inf", "cli.py", "    if not math.isfinite(value):", "    if math.isnan(value):",
        "tests/test_cli.py", "a finite-number flag accepts inf"),
    bug("cli-context-of-any-error", "cli.py",
        "error.__cause__ or (error.__context__ if type(error) is RuntimeError else None)",
        "error.__cause__ or error.__context__", FA_BUG_TB,
        "a bug raised while an OSError was handled is reported as that OSError (traceback lost)"),
    bug("cli-writable-not-probed", "cli.py", "        with tempfile.TemporaryFile(dir=existing):\n            pass\n",
        "        pass\n",
        "tests/test_cli.py", "an unwritable output folder is accepted (found only after the work)"),
    bug("cli-writable-no-parents", "cli.py", "        folder.mkdir(parents=True, exist_ok=True)\n    except OSError",
        "        folder.mkdir(exist_ok=True)\n    except OSError", "tests/test_cli.py",
        "an output folder whose parent does not exist yet is refused instead of created"),
    # export_hf.py ----------------------------------------------------------------------------------------------------
    bug("export_hf-gate-up-swapped", "export_hf.py",
        '(f"{ours}ffn.fc.{kind}", (f"{hf}mlp.up_proj.{kind}", f"{hf}mlp.gate_proj.{kind}")),',
        '(f"{ours}ffn.fc.{kind}", (f"{hf}mlp.gate_proj.{kind}", f"{hf}mlp.up_proj.{kind}")),', EHF_UNITS,
        "the SwiGLU halves go to the wrong transformers tensors"),
    bug("export_hf-padding-exported", "export_hf.py",
        '    state["wte.weight"] = state["wte.weight"][:model.config.vocab_size]  # (V, C)\n', "", EHF_UNITS,
        "the padded vocabulary rows are exported"),
    bug("export_hf-force-wipes-any-folder", "export_hf.py", "    if problem is not None:\n",
        "    if False:\n", "tests/test_export_hf.py::test_bad_input_is_one_line_without_traceback",
        "--force replaces a folder that is not an earlier export"),
    bug("export_hf-temp-left", "export_hf.py", "        shutil.rmtree(tmp, ignore_errors=True)\n        raise\n",
        "        raise\n", EHF_UNITS, "a failed export leaves its temporary folder"),
    bug("export_hf-old-export-left", "export_hf.py", "    shutil.rmtree(old, ignore_errors=True)\n", "", EHF_UNITS,
        "--force leaves the replaced export as a hidden .old folder"),
    bug("export_hf-card-metrics-before-step", "export_hf.py", 'step is None or e["step"] <= step',
        'step is None or e["step"] < step', EHF, "the model card omits the metrics of the exported step itself"),
    # plot_metrics.py -------------------------------------------------------------------------------------------------
    bug("plot_metrics-line-numbers", "plot_metrics.py", "enumerate(file.read_bytes().splitlines(), start=1)",
        "enumerate(file.read_bytes().splitlines())", FA_METRICS, "warnings name the line before the bad one"),
    bug("plot_metrics-bool-step", "plot_metrics.py", "if not isinstance(step, int) or isinstance(step, bool) or step < 0:",
        "if not isinstance(step, int) or step < 0:", FA_METRICS + " " + PM, '"step": true is read as step 1'),
    bug("plot_metrics-negative-step", "plot_metrics.py", "if not isinstance(step, int) or isinstance(step, bool) or step < 0:",
        "if not isinstance(step, int) or isinstance(step, bool):", FA_METRICS + " " + PM, "a negative step is read"),
    bug("plot_metrics-latest-none", "plot_metrics.py", '            if key != "step" and value is not None:',
        '            if key != "step":', PM + " " + EHF, "a null value replaces the latest real one"),
    bug("plot_metrics-mfu-not-percent", "plot_metrics.py", "            values = [100 * v for v in values]\n",
        "            values = list(values)\n", PM, "the MFU panel plots fractions under a percent label"),
    bug("plot_metrics-hellaswag-not-percent", "plot_metrics.py", "        return steps, [100 * v for v in values]",
        "        return steps, values", PM, "HellaSwag accuracy plotted as a fraction against a 25% chance line"),
    bug("plot_metrics-bad-number-accepted", "plot_metrics.py",
        "if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):",
        "if value is not None and not isinstance(value, (int, float)):", FA_METRICS + " " + PM,
        '"loss": true is plotted as 1'),
]


# ----------------------------------------------------------------------------------------------------------------

def check_snippets(bugs, root: Path) -> list[str]:
    """Problems with the table: a snippet not found exactly once, a no-op mutation, a duplicate name."""
    problems, names = [], set()
    for b in bugs:
        if b.name in names:
            problems.append(f"{b.name}: duplicate name")
        names.add(b.name)
        path = root / b.module
        if not path.is_file():
            problems.append(f"{b.name}: {b.module} does not exist")
            continue
        count = path.read_text().count(b.original)
        if count != 1:
            problems.append(f"{b.name}: the original snippet occurs {count} times in {b.module} (must be 1):\n"
                            f"    {b.original!r}")
        if b.original == b.mutated:
            problems.append(f"{b.name}: the mutation changes nothing")
        for t in b.tests:
            file, _, test = t.partition("::")
            if not (root / file).is_file():
                problems.append(f"{b.name}: test file {file} does not exist")
            elif test and f"def {test.split('[')[0]}(" not in (root / file).read_text():
                problems.append(f"{b.name}: {file} has no test {test}")  # pytest would error out: a false "caught"
    return problems


def make_base(into: Path, worktree: bool) -> Path:
    """The repo as committed (HEAD, via git archive), or with --worktree as it is on disk now (uncommitted edits
    included; .venv, .git and caches left out)."""
    if worktree:
        def ignore(folder, names):
            return [n for n in names if n in EXCLUDE or n.endswith(".pyc")]
        shutil.copytree(REPO, into, ignore=ignore, symlinks=True)
    else:
        into.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def scratch_copy(base: Path, into: Path) -> Path:
    shutil.copytree(base, into, symlinks=True)
    shared = REPO.parent / "shared"  # the developers' data beside the checkout (../shared)
    if shared.exists() and not (into.parent / "shared").exists():
        (into.parent / "shared").symlink_to(shared)
    return into


def run_tests(root: Path, tests, timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout', seconds, the output's tail). A run past `timeout` (a planted bug can make a
    loop endless) is killed with every process it started."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "timeout", time.monotonic() - start, out[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # pytest: 0 passed, 1 a test failed, 2 an error while collecting (the bug breaks an import); 3-5 (internal error,
    # bad usage, no test collected) say nothing about the bug
    status = {0: "pass", 1: "fail", 2: "fail"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
    return status, time.monotonic() - start, out[-2000:]


def plant(root: Path, b: Bug) -> str:
    """Plant `b` in the copy at `root`; returns the original text (to restore)."""
    path = root / b.module
    text = path.read_text()
    if text.count(b.original) != 1:
        raise SystemExit(f"{b.name}: snippet not found exactly once in the scratch copy of {b.module}")
    path.write_text(text.replace(b.original, b.mutated))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="module names (dataloader, checkpoint, ...); default: all")
    parser.add_argument("--bug", action="append", default=[], help="one bug by name (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="bugs run side by side, each in its own scratch copy")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per bug's test run (a timeout is "
                                                                    "reported, and counted as caught)")
    parser.add_argument("--list", action="store_true", help="print the table and stop")
    parser.add_argument("--check", action="store_true", help="only check that every snippet is found")
    parser.add_argument("--baseline", action="store_true", help="first run each set of test files unmutated")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (their path is printed)")
    parser.add_argument("--worktree", action="store_true", help="plant into the files as they are on disk now "
                                                                    "(default: as committed, git HEAD)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the test output of survivors too")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="plant_bugs_"))
    try:
        return run(args, parser, scratch)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


def run(args, parser, scratch: Path) -> int:
    names = [b.name for b in BUGS]
    assert len(names) == len(set(names)), "duplicate bug names in the table"
    known = {Path(b.module).stem for b in BUGS}
    unknown = [m for m in args.modules if m not in known] + [n for n in args.bug if n not in {b.name for b in BUGS}]
    if unknown:
        parser.error(f"unknown module or bug {unknown}; modules: {sorted(known)}")
    everything = not args.modules and not args.bug
    bugs = [b for b in BUGS if everything or Path(b.module).stem in args.modules or b.name in args.bug]
    if args.list:
        for b in bugs:
            print(f"{b.name:42} {b.module:18} {' '.join(b.tests)}\n    {b.description}")
        return 0
    base = make_base(scratch / "base", args.worktree)
    problems = check_snippets(bugs, base)
    if problems:
        print(f"the bug table does not match the code ({'on disk' if args.worktree else 'git HEAD'}):\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(bugs)} bugs, every snippet found exactly once ({'on disk' if args.worktree else 'git HEAD'})")
        return 0

    copies: Queue = Queue()
    for i in range(max(1, min(args.jobs, len(bugs)))):
        copies.put(scratch_copy(base, scratch / f"copy{i}" / "repo"))
    print(f"{len(bugs)} bugs, {copies.qsize()} scratch copies under {scratch}", flush=True)

    failed_baselines = []
    if args.baseline:
        test_sets = sorted({b.tests for b in bugs})
        def baseline(tests):
            root = copies.get()
            try:
                return tests, run_tests(root, tests, args.timeout)
            finally:
                copies.put(root)
        with ThreadPoolExecutor(copies.qsize()) as pool:
            for tests, (status, seconds, out) in pool.map(baseline, test_sets):
                print(f"baseline {status:7} {seconds:6.0f}s  {' '.join(tests)}", flush=True)
                if status != "pass":
                    failed_baselines.append(tests)
                    print(out, flush=True)
        if failed_baselines:
            print("a baseline failed: fix it (or the table) first", file=sys.stderr)
            return 1

    def one(b: Bug):
        root = copies.get()
        try:
            text = plant(root, b)
            try:
                status, seconds, out = run_tests(root, b.tests, args.timeout)
            finally:
                (root / b.module).write_text(text)
        finally:
            copies.put(root)
        verdict = ("survived" if status == "pass" else "caught" if status == "fail" else
                   "caught (timeout)" if status == "timeout" else status)
        caught_by = next((line.split(" ", 1)[1].split(" - ")[0] for line in out.splitlines()
                          if line.startswith(("FAILED ", "ERROR "))), "")
        print(f"{verdict:17} {seconds:6.0f}s  {b.name:42} {caught_by}", flush=True)
        if verdict.startswith("error") or (verdict == "survived" and args.verbose):
            print(out, flush=True)
        return b, verdict, seconds, caught_by

    with ThreadPoolExecutor(copies.qsize()) as pool:
        results = list(pool.map(one, bugs))

    print(f"\n{'result':10} {'bug':42} {'module':18} caught by / description")
    for b, verdict, seconds, caught_by in results:
        print(f"{verdict.split()[0]:10} {b.name:42} {b.module:18} {caught_by or b.description}")
    survivors = [b for b, verdict, *_ in results if verdict == "survived"]
    errors = [b for b, verdict, *_ in results if verdict.startswith("error")]
    caught = len(results) - len(survivors) - len(errors)
    print(f"\n{caught} of {len(results)} caught; survivors: {', '.join(b.name for b in survivors) or 'none'}"
          + (f"; errors (fix the table): {', '.join(b.name for b in errors)}" if errors else ""))
    return 1 if survivors or errors else 0


if __name__ == "__main__":
    sys.exit(main())
