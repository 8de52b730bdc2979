"""Mutation check of the training wiring and the measures: each entry breaks one line of a method or a
measure (drops the attack, ignores a flag, flips a comparison) in a scratch copy of the repository and
runs the tests that must then fail. A mutant that leaves them green is a test gap.

Usage:   python scripts/mutants.py                 # every mutant (108: 9 minutes on 2 CPU cores)
         python scripts/mutants.py --only ema      # the mutants whose name contains 'ema'
         python scripts/mutants.py --list          # the table, nothing run
Exit code 1 if a mutant survives or no longer applies (its line changed: update the table).
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file, exact original text, mutated text, tests that must fail)
W = "tests/test_wiring.py"
STEP = (W + "::test_train_step_equals_hand_formula[{}]").format  # one scenario of the hand-formula test
MAIN = (W + "::test_main_wiring[{}]").format
MISC = "tests/test_misc.py::{}".format
FIRST = "tests/test_first_hour.py::"
MEAS = "tests/test_measures.py::"
PC = "tests/test_paper_code.py::"
TAB = "tests/test_plots_measures.py::"
MUTANTS = [
    # ---- train_at.py: the step
    ("at-clean-inputs", "train_at.py", "x_adv = adversarial_batch(attack_model, x, y, args)", "x_adv = x",
     STEP("at-pgd-eval-bn")),
    ("at-attack-bn-ignored", "train_at.py", "bn=args.attack_bn, autocast=args.amp, norm=args.norm)",
     'bn="eval", autocast=args.amp, norm=args.norm)',
     STEP("at-pgd-train-bn")),
    ("at-label-smoothing-ignored", "train_at.py", "label_smoothing=args.label_smoothing)", "label_smoothing=0.0)",
     STEP("at-adam-smoothing")),
    ("at-label-noise-ignored", "train_at.py", "y = common.noisy_labels(y, args.label_noise, logits.shape[1])", "y = y",
     STEP("at-no-attack-smoothing-noise")),
    ("at-step-clip-ignored", "train_at.py", "common.clip_weights(common.unwrap(model), args.clip)", "pass",
     STEP("at-clip-ema")),
    ("at-ema-update-skipped", "train_at.py", "ema.update_parameters(common.unwrap(model))", "pass",
     STEP("at-clip-ema")),
    ("at-sched-step-dropped", "train_at.py", "sched.step()", "pass", STEP("at-pgd-eval-bn")),
    # ---- train_at.py: main
    ("at-init-clip-dropped", "train_at.py", "common.clip_weights(net, args.clip)", "pass", MAIN("at")),
    ("at-ema-inverted", "train_at.py", "get_ema_multi_avg_fn(args.ema)", "get_ema_multi_avg_fn(1 - args.ema)",
     MAIN("at")),
    ("at-ema-bn-not-reestimated", "train_at.py", "common.reestimate_bn(ema, loader, world)", "pass", MAIN("at")),
    ("at-es-keeps-worst", "train_at.py", 'es["es_rerr"] < best["es_rerr"]', 'es["es_rerr"] > best["es_rerr"]',
     MAIN("at")),
    ("at-es-keeps-last-minimum", "train_at.py", 'es["es_rerr"] < best["es_rerr"]', 'es["es_rerr"] <= best["es_rerr"]',
     MAIN("at")),
    ("at-es-restarts-ignored", "train_at.py", 'args.attack_step, args.es_restarts, "es_"', 'args.attack_step, 1, "es_"',
     MAIN("at")),
    ("at-es-on-raw-model-with-ema", "train_at.py", "es_model = net if ema is None else ema.module", "es_model = net",
     MAIN("at")),
    ("at-logged-lr-of-next-epoch", "train_at.py", '"lr": lr, **common', '"lr": opt.param_groups[0]["lr"], **common',
     MAIN("at")),
    ("at-ema-bn-buffers-not-synced", "train_at.py", "            common.sync_buffers(ema, world)\n",
     "            pass\n", "tests/test_train_at.py::test_ddp_resume_equals_uninterrupted_run"),
    # ---- train_trades.py
    ("trades-beta-ignored", "train_trades.py", "trades_loss(logits_clean, logits, y, args.beta,",
     "trades_loss(logits_clean, logits, y, 6.0,", STEP("trades-beta")),
    ("trades-kl-direction-swapped", "train_trades.py",
     "F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1),",
     "F.kl_div(F.log_softmax(logits_clean, 1), F.softmax(logits_adv, 1),", STEP("trades-beta")),
    ("trades-kl-target-detached", "train_trades.py", "F.softmax(logits_clean, 1), reduction",
     "F.softmax(logits_clean.detach(), 1), reduction", STEP("trades-beta")),
    ("trades-clean-ce-dropped", "train_trades.py", "return natural + beta * robust", "return beta * robust",
     STEP("trades-beta")),
    ("trades-attack-on-ce", "train_trades.py",
     "common.pgd(model, x, p_clean, args.epsilon, args.attack_step, args.attack_steps, loss_fn=kl_each,",
     "common.pgd(model, x, y, args.epsilon, args.attack_step, args.attack_steps,", STEP("trades-beta")),
    ("trades-attack-start-uniform", "train_trades.py", 'start="normal"', 'start="uniform"', STEP("trades-beta")),
    ("trades-clean-probs-eval-bn", "train_trades.py", "common.bn_mode(model, args.attack_bn)",
     'common.bn_mode(model, "eval")', STEP("trades-train-bn-smoothing-noise")),
    # ---- train_mart.py
    ("mart-beta-ignored", "train_mart.py", "mart_loss(logits_clean, logits, y, args.beta,",
     "mart_loss(logits_clean, logits, y, 6.0,", STEP("mart-beta")),
    ("mart-weight-dropped", "train_mart.py", "(kl * (1.0000001 - p_true)).mean()", "kl.mean()", STEP("mart-beta")),
    ("mart-margin-dropped", "train_mart.py", " - torch.log(1.0001 - p_wrong + 1e-12).mean()", "",
     STEP("mart-beta")),
    # ---- train_awp.py
    ("awp-perturbation-not-applied", "train_awp.py", "add_to_weights(weights, nu, +1)", "pass", STEP("awp-xi")),
    ("awp-restore-dropped", "train_awp.py", "add_to_weights(weights, nu, -1)", "pass", STEP("awp-xi")),
    ("awp-direction-flipped", "train_awp.py", "nu = {k: xi * g *", "nu = {k: -xi * g *", STEP("awp-xi")),
    ("awp-grad-clip-in-warmup", "train_awp.py", "if args.grad_clip and xi > 0:", "if args.grad_clip:",
     STEP("awp-warmup-step-clip-ema")),
    ("awp-xi-ignored", "train_awp.py", "xi = args.xi if epoch", "xi = 0.005 if epoch", MAIN("awp")),
    ("awp-warmup-ignored", "train_awp.py", "if epoch > args.awp_warmup else", "if epoch > 0 else", MAIN("awp")),
    # ---- train_misc.py
    ("misc-rot-weight-ignored", "train_misc.py", "class_loss + args.rot_weight * rot_loss", "class_loss + 4.0 * rot_loss",
     MISC("test_rotation_step_by_hand")),
    ("misc-unlabeled-fraction-ignored", "train_misc.py", "args.batch_size, args.unlabeled_fraction, device",
     "args.batch_size, 0.7, device", MISC("test_main_wires_each_method[unlabeled]")),
    ("misc-esgd-gamma-ignored", "train_misc.py", "scoped_gamma(args.esgd_gamma,", "scoped_gamma(1e-4,",
     MISC("test_entropy_sgd_step_by_hand")),
    ("misc-esgd-L-ignored-in-step", "train_misc.py", "inner_loss, args.L, gamma", "inner_loss, 1, gamma",
     MISC("test_entropy_sgd_step_by_hand")),
    ("misc-esgd-L-ignored-in-main", "train_misc.py", "outer_steps(loader, args.L)", "outer_steps(loader, 1)",
     MISC("test_main_wires_each_method[entropy-sgd]")),
    ("misc-pgd-tau-ignored", "train_misc.py", "args.attack_steps, args.tau,", "args.attack_steps, 2,",
     MISC("test_pgd_tau_step_by_hand")),
    ("misc-esgd-bn-scales-decay-to-zero", "train_misc.py", "wd * (p - c)", "wd * p", MISC("test_entropy_sgd_step_by_hand")),
    ("misc-rotation-head-bn-before-relu", "train_misc.py", "nn.ReLU(), nn.BatchNorm1d(features // 2)",
     "nn.BatchNorm1d(features // 2), nn.ReLU()", MISC("test_rotation_head_is_the_papers_linear_relu_bn_linear_with_kaiming_init")),
    ("misc-rotation-head-default-init", "train_misc.py", 'nn.init.kaiming_normal_(m.weight, nonlinearity="relu")', "pass",
     MISC("test_rotation_head_is_the_papers_linear_relu_bn_linear_with_kaiming_init")),
    ("misc-crop-pads-with-zero", "train_misc.py", "padding=4, fill=fill)", "padding=4)",
     MISC("test_autoaugment_pads_and_fills_with_the_mean_colour")),
    ("misc-autoaugment-fills-with-zero", "train_misc.py", "T.AutoAugment(policy, fill=list(fill))", "T.AutoAugment(policy)",
     MISC("test_autoaugment_pads_and_fills_with_the_mean_colour")),
    ("misc-cutout-fills-with-zero", "train_misc.py", "min(cx + s, w)] = self.fill", "min(cx + s, w)] = 0",
     MISC("test_cutout_fills_one_square_with_the_mean_colour_clipped_at_the_border")),
    ("misc-es-on-raw-model-with-ema", "train_misc.py", "es_model = net if ema is None else ema.module", "es_model = net",
     MISC("test_main_wires_each_method[rotation]")),
    ("misc-logged-lr-of-next-epoch", "train_misc.py", '"lr": lr, **common', '"lr": opt.param_groups[0]["lr"], **common',
     MISC("test_main_wires_each_method[rotation]")),
    # ---- common.py (only inside functions whose text is fixed: pgd, clip_weights, noisy_labels, ...)
    ("common-clip-bn-scale-to-zero", "common.py", "m.weight.clamp_(1 - w, 1 + w)", "m.weight.clamp_(-w, w)",
     STEP("at-clip-ema")),
    ("common-wd-bn-scales-to-zero", "common.py", "p.grad.sub_(args.wd)", "pass",
     "tests/test_regularisers.py::test_weight_decay_pulls_bn_scales_to_one_and_weights_to_zero " + STEP("at-pgd-eval-bn")),
    ("common-cyclic-momentum-fixed", "common.py", 'group["momentum"] = m\n', "pass\n",
     "tests/test_regularisers.py::test_cyclic_schedule_cycles_sgd_momentum_inversely_to_the_lr_and_resumes"),
    # ---- common.py: the run folder's commit protocol and its repair on --resume
    ("runfolder-best-never-written", "common.py", "        if is_best:\n", "        if False:\n",
     "tests/test_run_folder.py::test_reference_run"),
    ("runfolder-metrics-not-repaired", "common.py", 'write_jsonl(metrics, ckpt["history"])', "pass",
     "tests/test_run_folder.py::test_torn_metrics_line_is_dropped_with_a_warning"),
    ("runfolder-stale-best-kept", "common.py", 'weights_only=True)["epoch"] != best["epoch"]):',
     'weights_only=True)["epoch"] == best["epoch"]):', "tests/test_run_folder.py::test_crash_at_every_write_then_resume"),
    ("runfolder-tmp-files-kept", "common.py", "    for tmp in out.glob(\"*.tmp\"):\n        tmp.unlink()\n    metrics",
     "    metrics", "tests/test_run_folder.py::test_crash_at_every_write_then_resume"),
    ("runfolder-resume-overwrites-results", "common.py", "check(not holds_results(out), f\"--resume:",
     "check(True, f\"--resume:", "tests/test_run_folder.py::test_resume_refuses_a_run_without_a_checkpoint"),
    ("runfolder-last-before-snapshot-missing", "common.py",
     "    if \"es_rerr\" in ckpt[\"metrics\"] and not snapshot_path(out, epoch).is_file():",
     "    if False:", "tests/test_run_folder.py::test_resume_without_ckpt_last_uses_the_newest_snapshot"),
    # ---- bench.py: row 1 must time the training loop's own step
    ("bench-own-step", "bench.py",
     "common.add_stats(sums, train_at.train_step(net, net, opt, sched, None, x, y, args_at))",
     "common.add_stats(sums, {'n': torch.tensor(float(len(y)))})",
     "tests/test_bench.py::test_timed_step_is_the_training_loops_step"),
    # ---- what a new user meets first (README "Conventions": what a command line says; "Quick start")
    ("first-pixels-accept-0-255", "common.py", "    if not 0 <= value <= 1:", "    if not 0 <= value <= 255:",
     FIRST + "test_pixel_flags_refuse_the_0_255_scale"),
    ("first-epsilon-not-pixels", "train_mart.py", '"--epsilon", type=common.pixels', '"--epsilon", type=fraction',
     FIRST + "test_pixel_flags_refuse_the_0_255_scale"),
    ("first-data-dir-left-behind", "common.py", "            shutil.rmtree(created, ignore_errors=True)", "            pass",
     FIRST + "test_a_wrong_data_dir_creates_nothing"),
    ("first-help-first-line", "common.py", 'description.split("\\n\\n")[0].split()', 'description.split("\\n")[0].split()',
     FIRST + "test_help_gives_the_whole_description"),
    ("first-progress-inner-loop-only", "common.py", '" | ".join(_loop_status(o, now) for o in _open_loops)',
     "_loop_status(loop, now)", FIRST + "test_progress_lines_name_each_open_loop"),
    ("first-progress-worst-case-passes-silent", "flatness.py", "generator=generator, progress=progress, box=box, norm=norm,",
     "generator=generator, box=box, norm=norm,", FIRST + "test_training_and_measures_report_progress"),
    ("first-ctrl-c-traceback", "common.py", "    except KeyboardInterrupt:", "    except ZeroDivisionError:",
     FIRST + "test_ctrl_c_in_a_measure_is_one_line"),
    ("first-ctrl-c-run-folder-unnamed", "common.py", "    _interrupted[:] = [lambda: interrupted_run(args.out, args.epochs)]",
     "    pass", FIRST + "test_ctrl_c_in_training_says_what_was_kept"),
    ("first-quickstart-drops-awp", "scripts/quickstart_cpu.sh", "for method in at awp; do", "for method in at; do",
     FIRST + "test_the_readme_quick_start_is_what_the_script_runs"),
    ("first-results-share-a-name", "evaluate.py", '    label = f"{elsewhere}_{label}" if elsewhere not in ("", "..") else label',
     "    pass", "tests/test_guardrails.py::test_flatness_result_names_follow_the_same_rule"),
    ("first-arch-flags-ignored", "evaluate.py", "        check_arch_flags(args, args.checkpoint, ckpt[\"args\"])\n",
     "", "tests/test_guardrails.py::test_agreeing_flags_load_and_contradictions_stop_both_tools"),
    ("first-layout-not-named", "evaluate.py", "        if have and built and (have[\"arch\"], have[\"width\"]) != (built[\"arch\"], built[\"width\"]):",
     "        if False:", "tests/test_guardrails.py::test_a_state_dict_of_another_layout_names_it"),
    ("first-plots-regularised-baseline", "plots.py", 'r["args"].get("method", "at") == "at" and not differing_flags(',
     'r["args"].get("method", "at") in ("at", "awp") and not differing_flags(',
     "tests/test_plots_runs.py::test_the_quick_start_beside_one_epoch_method_runs_is_the_at_baseline"),
    ("first-plots-other-folders-result", "plots.py", '    if Path(settings.get("checkpoint", "")).parent != Path("."):',
     "    if False:", "tests/test_plots_runs.py::test_a_result_of_another_folders_checkpoint_is_not_this_runs"),
    ("first-cache-per-test", "tests/conftest.py", '@pytest.fixture(scope="session", autouse=True)\ndef _cache_dir',
     "@pytest.fixture(autouse=True)\ndef _cache_dir", "tests/test_evaluate.py"),
    # ---- flatness.py: the other measures (README "Other flatness measures")
    ("measures-linf-step-not-adaptive", "flatness.py", "g.sign_().mul_(scale[k]).mul_(eta)", "g.sign_().mul_(eta)",
     MEAS + "test_adaptive_worst_case_matches_a_sharpness_py_style_loop"),
    ("measures-momentum-swapped", "flatness.py", "z[k].mul_(0.75).add_(prev[k], alpha=0.25)",
     "z[k].mul_(0.25).add_(prev[k], alpha=0.75)",
     MEAS + "test_adaptive_worst_case_matches_a_sharpness_py_style_loop"),
    ("measures-no-reload-at-best", "flatness.py", "                        reload = i < steps\n",
     "                        reload = False\n", MEAS + "test_adaptive_worst_case_matches_a_sharpness_py_style_loop"),
    ("measures-never-halves", "flatness.py", "                        eta *= 0.5\n", "                        pass\n",
     MEAS + "test_adaptive_worst_case_matches_a_sharpness_py_style_loop"),
    ("measures-l2-step-raw-gradient", "flatness.py", "gu = {k: g * scale[k] for k, g in zip(nu, grads)}",
     "gu = {k: g for k, g in zip(nu, grads)}",
     MEAS + "test_adaptive_and_magnitude_aware_measures_are_invariant_hessian_and_plain_pac_bayes_are_not"),
    ("measures-no-rho0-reference", "flatness.py", "        if start is not None:  # RLoss(w) with the ascent's input attack",
     "        if False:", MEAS + "test_adaptive_worst_case_is_zero_at_rho_zero_and_grows_with_rho"),
    ("measures-random-input-start", "flatness.py", "        start = None if delta is None else delta[sl]",
     "        start = None if delta is None else common.random_start(x[sl], eps, norm)",
     MEAS + "test_robust_adaptive_ascent_starts_at_the_references_adversarial_examples"),
    ("measures-worst-ignores-inputs", "flatness.py", "    if loss == \"robust\":\n        delta = adversarial_inputs(",
     "    if False:\n        delta = adversarial_inputs(", MEAS + "test_robust_adaptive_worst_case_attacks_the_inputs"),
    ("measures-average-noise-not-adaptive", "flatness.py", "nu[k] = z.mul_(rho * w.abs())", "nu[k] = z.mul_(rho)",
     MEAS + "test_adaptive_average_case_matches_a_hand_formula"),
    ("measures-linf-noise-gaussian", "flatness.py", "z = 2 * torch.rand(w.shape,", "z = 2 * torch.randn(w.shape,",
     MEAS + "test_adaptive_average_case_matches_a_hand_formula"),
    ("measures-average-attack-once", "flatness.py",
     "            perturbed = scored(Perturbed(model, plus(weights, nu)), logit_normalise)",
     "            perturbed = scored(model, logit_normalise)",
     MEAS + "test_adaptive_average_case_recomputes_the_attack_on_every_perturbed_model"),
    ("measures-pac-bayes-std-squared", "flatness.py", "torch.sqrt(sigma ** 2 * w ** 2 + magnitude_eps ** 2)",
     "sigma ** 2 * w ** 2 + magnitude_eps ** 2", MEAS + "test_pac_bayes_noise_has_jiang_et_als_variance"),
    ("measures-bisection-flipped", "flatness.py", "(low, sigma) if deviation > target_deviation else (sigma, high)",
     "(sigma, high) if deviation > target_deviation else (low, sigma)",
     MEAS + "test_pac_bayes_bisection_finds_the_target_deviation"),
    ("measures-mag-noise-absolute", "flatness.py", "std = sigma if magnitude_eps is None else", "std = sigma if True else",
     MEAS + "test_adaptive_and_magnitude_aware_measures_are_invariant_hessian_and_plain_pac_bayes_are_not"),
    ("measures-probes-gaussian", "flatness.py",
     "v = {k: torch.randint(0, 2, w.shape, device=w.device, generator=g).to(w.dtype).mul_(2).sub_(1)",
     "v = {k: torch.randn(w.shape, device=w.device, generator=g).to(w.dtype)",
     MEAS + "test_hutchinson_probes_are_v_h_v_of_the_exact_hessian"),
    ("measures-robust-trace-clean-inputs", "flatness.py", "        if s[\"loss\"] == \"robust\":\n            x = adversarial_inputs(",
     "        if False:\n            x = adversarial_inputs(",
     MEAS + "test_robust_hessian_trace_is_at_the_references_adversarial_examples"),
    ("measures-no-logit-normalisation", "flatness.py", "ce = F.cross_entropy(normalise_logits(logits) if logit_normalise else logits, y)",
     "ce = F.cross_entropy(logits, y)", MEAS + "test_logit_normalisation_bounds_the_loss"),
    ("measures-weight-norm-with-bn", "flatness.py", "for w in frozen_weights(model).values()).item()}",
     "for w in model.parameters()).item()}", MEAS + "test_cli_mode_all_writes_every_measure"),
    ("measures-rho-ignores-norm", "flatness.py", '            s["rho"] = ADAPTIVE_RHO.get((mode, s["sharpness_norm"]))',
     '            s["rho"] = ADAPTIVE_RHO.get((mode, ADAPTIVE_NORM[mode]))',
     MEAS + "test_cli_adaptive_flags_choose_the_measure_and_name_its_file"),
    # ---- --estimator paper-code (evaluate.py, flatness.py; README "Deviations")
    ("paper-code-no-cap", "evaluate.py", "    return -torch.log(p_y + 1e-12)", "    return -torch.log(p_y)",
     PC + "test_capped_ce_is_minus_log_p_plus_1e_12_in_float32"),
    ("paper-code-uniform-start", "evaluate.py", "    g = torch.randn_like(x)\n", "    g = torch.rand_like(x) * 2 - 1\n",
     PC + "test_paper_code_start_is_a_gaussian_at_linf_radius_eps_u"),
    ("paper-code-max-ce-restart", "evaluate.py", "    return logits[p_wrong.argmax(0), torch.arange(len(y), device=y.device)]",
     "    return logits[F.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1), reduction='none').argmax(0), "
     "torch.arange(len(y), device=y.device)]",
     PC + "test_restart_choice_is_the_most_probable_wrong_class_not_the_highest_ce"),
    ("paper-code-own-clean-predictions", "evaluate.py", "            ok = clean_ok[i:i + batch_size]",
     "            ok = model(xb).argmax(1) == yb", PC + "test_rerr_counts_the_given_clean_correctness"),
    ("paper-code-estimator-always-hashed", "evaluate.py", '            and not (k == "estimator" and v == "project")}',
     "}", PC + "test_command_line_records_the_estimator_and_keeps_old_names"),
    ("paper-code-flatness-uncapped", "flatness.py",
     'ce.append(capped_ce(logits, y[sl]) if paper_code else F.cross_entropy(logits, y[sl], reduction="none"))',
     'ce.append(F.cross_entropy(logits, y[sl], reduction="none"))',
     PC + "test_flatness_paper_code_caps_the_loss_of_every_perturbed_model"),
    ("paper-code-flatness-own-clean", "flatness.py", "                         restarts, batch_size, progress, norm, estimator, clean_ok)",
     "                         restarts, batch_size, progress, norm, estimator)",
     PC + "test_flatness_paper_code_counts_the_unperturbed_clean_predictions"),
    ("paper-code-flatness-our-start", "flatness.py", "    if attack_inputs and paper_code:\n", "    if False:\n",
     PC + "test_flatness_paper_code_counts_the_unperturbed_clean_predictions"),
    ("paper-code-flatness-estimator-ignored", "flatness.py",
     '                                            s["seed"], progress, box=box, norm=s["norm"], estimator=s["estimator"])',
     '                                            s["seed"], progress, box=box, norm=s["norm"])',
     PC + "test_flatness_paper_code_caps_the_loss_of_every_perturbed_model"),
    # ---- plots.py: the measures table
    ("table-baselines-dropped", "plots.py", 'return [{"name": "weight norm Σ‖w_l‖²"',
     'return [][:0] and [{"name": "weight norm Σ‖w_l‖²"', TAB + "test_a_row_per_measure_and_baseline_with_its_n"),
    ("table-tau-sign-lost", "plots.py", "kendall_tau=float(kt.statistic)", "kendall_tau=float(abs(kt.statistic))",
     TAB + "test_a_monotone_measure_has_tau_one_and_an_anti_monotone_one_minus_one"),
    ("table-train-images-counted", "plots.py", 'DEFAULT_SUBSETS = ("eval", None)',
     'DEFAULT_SUBSETS = ("eval", None, "train-eval")', TAB + "test_a_row_per_measure_and_baseline_with_its_n"),
    ("table-gap-flipped", "plots.py", '"gap": p["rloss"] - p["rloss_train"]', '"gap": p["rloss_train"] - p["rloss"]',
     TAB + "test_baselines_are_the_weight_norm_and_train_rloss"),
    ("table-kendall-p-asymptotic", "plots.py", "exact_p(rx, ry), exact_p(x, y, kendall_s)", "exact_p(rx, ry), kt.pvalue",
     TAB + "test_kendall_p_is_exact_for_few_points_and_scipys_above"),
    ("table-groups-keyed-on-every-axis", "plots.py",
     "groups.setdefault(tuple(v for a, v in h.items() if a != axis), []).append(k)",
     "groups.setdefault(tuple(v for a, v in h.items()), []).append(k)",
     TAB + "test_granulated_kendall_equals_a_hand_computation_on_a_grid"),
    ("table-no-checkpoint-axis", "plots.py", '**{f: format_value(f, args.get(f)) for f in size}, "checkpoint": p["kind"]}',
     '**{f: format_value(f, args.get(f)) for f in size}}',
     TAB + "test_granulated_kendall_over_the_runs_hyper_parameters"),
    ("table-settings-mixed", "plots.py", "same = [e for e in found if setting_key(measure_setting(e)) == keep]",
     "same = found", TAB + "test_settings_are_never_mixed_and_the_left_out_are_named"),
    ("table-old-results-not-ours", "plots.py", '        settings = {"estimator": "project", **settings}',
     "        pass", TAB + "test_a_result_from_before_the_estimator_is_ours"),
]


def table_problems(root):
    """What keeps a mutant of the table from meaning anything in the tree at `root`: its original text not exactly
    once in its file (the line changed: the mutant is stale), a test it names that does not exist (pytest would
    exit "not found", not "failed"), a name used twice. Empty when the table is in step with the code."""
    problems = [f"two mutants are named {name}" for name, n in Counter(m[0] for m in MUTANTS).items() if n > 1]
    for name, file, old, new, tests in MUTANTS:
        count = (root / file).read_text().count(old)
        if count != 1 or old == new:
            problems.append(f"STALE     {name}: {old!r} occurs {count} times in {file}")
        for test in tests.split():
            path, _, func = test.partition("::")
            if not (root / path).is_file() or (func and f"def {func.split('[')[0]}(" not in (root / path).read_text()):
                problems.append(f"NO TEST   {name}: {test} does not exist")
    return problems


def copy_repo(dst):
    """Tracked and untracked-but-not-ignored files of the working tree."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="run the mutants whose name contains this")
    p.add_argument("--list", action="store_true", help="print the table and exit")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if args.only in m[0]]
    if args.list:
        for name, file, old, new, tests in chosen:
            print(f"{name:32s} {file:16s} {old!r} -> {new!r}  [{tests}]")
        return
    problems = table_problems(ROOT)
    if problems:  # a stale mutant would be skipped, a missing test counted as a survivor: mend the table first
        print("\n".join(problems))
        sys.exit(1)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy_repo(work)
        for name, file, old, new, tests in chosen:
            path = work / file
            original = path.read_text()
            path.write_text(original.replace(old, new))
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                   *tests.split()], cwd=work, capture_output=True, text=True)
            path.write_text(original)
            killed = proc.returncode == 1  # 1: tests failed (2-5: interrupted, usage error, nothing collected)
            print(f"{'killed' if killed else 'SURVIVED':9s} {name} ({time.time() - t0:.0f} s)", flush=True)
            if not killed:
                failed.append(name)
    print(f"{len(chosen) - len(failed)} of {len(chosen)} mutants killed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
