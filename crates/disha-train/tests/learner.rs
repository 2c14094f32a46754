//! The training loop on a small randomly initialized byte-level Llama: masking, accumulation,
//! clipping, determinism, and that loss actually falls.

mod common;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use disha_core::{PeftConfig, PeftModelExt, TargetModules, freeze_all_but_active_adapters};
use disha_models::llama::Llama;
use disha_models::{CausalLm, RandomWeights, TextTokenizer, causal_lm_loss};
use disha_train::data::{DataLoader, Example, PromptTemplate, Record, collate, encode_example};
use disha_train::learner::{Learner, LearnerConfig, clip_grad_norm, global_grad_norm};
use disha_train::schedule::{LrSchedule, ScheduleKind};

/// `(input_ids, labels)` of one example as a batch of one (the library's own collation).
fn batch_of_one(e: &Example, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let b = collate(&[e], 258);
    (
        Tensor::from_data(TensorData::new(b.input_ids, b.shape), device),
        Tensor::from_data(TensorData::new(b.labels, b.shape), device),
    )
}

fn model(device: &Device) -> CausalLm {
    let c = common::tiny_byte_level_config();
    let mut m: CausalLm = Llama::from_source(&c, &mut RandomWeights::new(&c, 0.2, 7), device)
        .unwrap()
        .into();
    m.add_adapter("default", &PeftConfig::miss(4, TargetModules::AllLinear))
        .unwrap();
    freeze_all_but_active_adapters(m)
}

/// "a+b=" → the digit sum, a task the random model cannot do.
fn examples() -> Vec<Example> {
    let t = TextTokenizer::byte_level();
    (0..40)
        .map(|i| {
            let (a, b) = (i % 7, (i * 3) % 5);
            let record = Record {
                line: i + 1,
                instruction: format!("{a}+{b}="),
                input: None,
                output: format!("{}", a + b),
            };
            encode_example(&record, PromptTemplate::Raw, &t, 32)
                .unwrap()
                .unwrap()
        })
        .collect()
}

fn learner_config(steps: usize, grad_accum: usize) -> LearnerConfig {
    LearnerConfig {
        max_steps: steps,
        grad_accum,
        schedule: LrSchedule {
            peak: 1e-2,
            warmup_steps: 2,
            total_steps: steps,
            kind: ScheduleKind::Cosine,
        },
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
    }
}

#[test]
fn loss_counts_only_response_tokens() {
    let device = Device::default();
    let m = model(&device);
    let e = &examples()[3];
    let (ids, labels) = batch_of_one(e, &device);
    let logits = m.forward(ids.clone());
    let loss = causal_lm_loss(logits.clone(), labels).into_scalar::<f64>();
    // Host reference: mean over response positions of -log softmax(logits[t-1])[label[t]].
    let v = 259;
    let values = logits.into_data().try_to_vec_as::<f32>().unwrap();
    let mut total = 0.0;
    let mut n = 0;
    for t in 1..e.labels.len() {
        if e.labels[t] < 0 {
            continue;
        }
        let row = &values[(t - 1) * v..t * v];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        total += lse - row[e.labels[t] as usize] as f64;
        n += 1;
    }
    assert_eq!(n, e.target_count());
    assert!(n >= 2 && n < e.labels.len() - 1, "prompt must be masked");
    // f32 logits, f64 host reduction over ≤ 3 terms.
    assert!(
        (loss - total / n as f64).abs() < 1e-5,
        "{loss} vs {}",
        total / n as f64
    );
}

#[test]
fn accumulation_equals_the_big_batch() {
    let device = Device::default().autodiff();
    let run = |batch, accum| {
        let mut data = DataLoader::new(examples(), batch, 3, 258);
        let mut learner = Learner::new(model(&device), learner_config(1, accum)).unwrap();
        learner.train_step(&mut data).unwrap()
    };
    let big = run(8, 1);
    let small = run(2, 4);
    // Same 8 examples, loss normalized over all their targets either way: the loss and the
    // gradient norm agree up to f32 summation order.
    assert!(
        (big.loss - small.loss).abs() < 1e-5,
        "{} vs {}",
        big.loss,
        small.loss
    );
    assert!(
        (big.grad_norm - small.grad_norm).abs() < 1e-4 * big.grad_norm,
        "{} vs {}",
        big.grad_norm,
        small.grad_norm
    );
    assert_eq!(big.tokens, small.tokens);
}

#[test]
fn packing_does_not_leak_between_examples() {
    let device = Device::default().autodiff();
    // Two rows of at most 16 tokens: 2 examples (6-7 tokens each) per row.
    let mut packed_data = DataLoader::new(examples(), 2, 3, 258).with_packing(16);
    let batch = packed_data.clone().next_batch();
    let segments = batch.segments.clone().expect("a packed batch");
    let used = packed_data
        .clone()
        .next_batch()
        .segments
        .unwrap()
        .concat()
        .len();
    assert!(segments.iter().all(|row| row.len() >= 2), "{segments:?}");
    assert!(segments.iter().all(|row| row.iter().sum::<usize>() <= 16));
    let mut packed = Learner::new(model(&device), learner_config(1, 1)).unwrap();
    let p = packed.train_step(&mut packed_data).unwrap();
    // The same examples (same seed, so the same order), one per padded row.
    let mut plain_data = DataLoader::new(examples(), used, 3, 258);
    let mut plain = Learner::new(model(&device), learner_config(1, 1)).unwrap();
    let u = plain.train_step(&mut plain_data).unwrap();
    assert_eq!(packed_data.position(), plain_data.position());
    assert_eq!(p.tokens, u.tokens);
    // Loss and gradient agree up to f32 summation order — any attention across a boundary,
    // or a label predicted from the previous example, would move them by far more.
    assert!((p.loss - u.loss).abs() < 1e-5, "{} vs {}", p.loss, u.loss);
    assert!(
        (p.grad_norm - u.grad_norm).abs() < 1e-4 * u.grad_norm,
        "{} vs {}",
        p.grad_norm,
        u.grad_norm
    );
    // And so do the updated adapters.
    let (ids, _) = batch_of_one(&examples()[0], &device);
    let diff = (packed.model().forward(ids.clone()) - plain.model().forward(ids))
        .abs()
        .max()
        .into_scalar::<f32>();
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn training_is_deterministic_and_the_loss_falls() {
    let device = Device::default().autodiff();
    let run = || {
        let mut data = DataLoader::new(examples(), 8, 11, 258);
        let mut learner = Learner::new(model(&device), learner_config(40, 1)).unwrap();
        (0..40)
            .map(|_| learner.train_step(&mut data).unwrap().loss)
            .collect::<Vec<f64>>()
    };
    let a = run();
    assert_eq!(a, run(), "same seed, same loss trace");
    eprintln!("loss trace: {:.3} ... {:.3}", a[0], a[39]);
    let first: f64 = a[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = a[35..].iter().sum::<f64>() / 5.0;
    // The answer digit is learnable from "a+b="; measured 6.7 -> 2.5 over 40 steps. Require 2x.
    assert!(last < first / 2.0, "loss {first:.3} -> {last:.3}");
}

#[test]
fn non_finite_loss_stops_with_a_message_and_keeps_the_model() {
    let device = Device::default().autodiff();
    let mut data = DataLoader::new(examples(), 4, 1, 258);
    let mut config = learner_config(3, 1);
    config.schedule.peak = 1e30;
    config.schedule.warmup_steps = 0;
    config.max_grad_norm = None;
    let mut learner = Learner::new(model(&device), config).unwrap();
    let mut error = None;
    for _ in 0..3 {
        if let Err(e) = learner.train_step(&mut data) {
            error = Some(e.to_string());
            break;
        }
    }
    let error = error.expect("a 1e30 learning rate must blow up");
    assert!(
        error.contains("is NaN") || error.contains("is inf"),
        "{error}"
    );
    // The learner still holds a model (the last good one).
    let _ = learner.model();
}

#[test]
fn bad_settings_are_named() {
    let device = Device::default().autodiff();
    let mut c = learner_config(1, 0);
    assert!(
        Learner::new(model(&device), c.clone())
            .unwrap_err()
            .to_string()
            .contains("grad_accum")
    );
    c.grad_accum = 1;
    c.beta2 = 1.0;
    assert!(
        Learner::new(model(&device), c)
            .unwrap_err()
            .to_string()
            .contains("beta2")
    );
}

#[test]
fn clipping_scales_the_global_norm_down_to_the_limit() {
    let device = Device::default().autodiff();
    let m = model(&device);
    let e = &examples()[0];
    let (ids, labels) = batch_of_one(e, &device);
    let loss = causal_lm_loss(m.forward(ids), labels);
    let mut grads = GradientsParams::from_grads(loss.backward(), &m);
    let before = global_grad_norm(&m, &grads);
    assert!(before > 0.1, "{before}");
    assert_eq!(clip_grad_norm(&m, &mut grads, before * 2.0), before);
    assert!(
        (global_grad_norm(&m, &grads) - before).abs() < 1e-9 * before,
        "no clip below the limit"
    );
    clip_grad_norm(&m, &mut grads, 0.1);
    assert!(
        (global_grad_norm(&m, &grads) - 0.1).abs() < 1e-5,
        "{}",
        global_grad_norm(&m, &grads)
    );
}

/// f16 compute scales the loss (`LossScaler`): a learner started at the largest scale, where
/// the f16 backward overflows (the first activation gradient, `2²⁴ / targets`, is past f16's
/// 65504), halves the scale and runs the step's batches again until its gradients are finite,
/// and then takes the same step as a learner started at the default 2¹⁶: scaling by a power of
/// two is exact while nothing overflows or underflows, so the two agree up to gradients that
/// sit in f16's subnormal range at one scale and not the other (measured: the same bits;
/// tolerance 1e-6 against an update of 1e-2 per element). The metrics report the scale used;
/// bf16 and f32 compute have none.
#[test]
fn f16_loss_scaling_backs_off_on_overflow_and_takes_the_same_step() {
    use disha_models::ComputeDtype;
    use disha_train::loss_scale::{INITIAL_LOSS_SCALE, LossScaler, MAX_LOSS_SCALE};
    let device = Device::default().autodiff();
    let f16_model = || {
        model(&device)
            .with_compute_dtype(ComputeDtype::F16)
            .unwrap()
    };
    let step = |scaler: Option<LossScaler>| {
        let mut data = DataLoader::new(examples(), 8, 11, 258);
        let mut config = learner_config(2, 2);
        config.schedule.warmup_steps = 0;
        // AdamW's update is blind to a gradient's scale unless ε is not negligible, and
        // clipping hides it too: with ε = 1 and no clipping, gradients left scaled would move
        // the adapters differently at each scale.
        config.eps = 1.0;
        config.max_grad_norm = None;
        let mut learner = Learner::new(f16_model(), config).unwrap();
        if let Some(s) = scaler {
            learner.set_loss_scaler(s).unwrap();
        }
        let metrics = learner.train_step(&mut data).unwrap();
        let tensors = learner.model().adapter_tensors("default").unwrap();
        (metrics, learner.loss_scaler().unwrap(), tensors)
    };
    let (m_default, s_default, t_default) = step(None);
    assert_eq!(m_default.loss_scale, Some(INITIAL_LOSS_SCALE));
    assert_eq!(s_default.scale(), INITIAL_LOSS_SCALE, "no overflow at 2^16");
    assert_eq!(s_default.good_steps(), 1);
    let (m_high, s_high, t_high) = step(Some(LossScaler::new(MAX_LOSS_SCALE)));
    assert!(
        m_high.loss_scale.unwrap() < MAX_LOSS_SCALE,
        "2^24 overflows an f16 backward: {m_high:?}"
    );
    assert_eq!(m_high.loss_scale, Some(s_high.scale()));
    assert_eq!(m_high.loss, m_default.loss, "the same batches");
    assert!((m_high.grad_norm - m_default.grad_norm).abs() <= 1e-6 * m_default.grad_norm);
    let before = model(&device).adapter_tensors("default").unwrap();
    for ((key, a), (_, b)) in t_high.iter().zip(&t_default) {
        let d = a
            .values
            .iter()
            .zip(&b.values)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(d <= 1e-6, "{key}: {d:e}");
    }
    for (key, t) in &t_default {
        assert_ne!(before[key].values, t.values, "{key}: the step was applied");
    }
    // bf16 and f32 compute need no scale, and a scale cannot be forced on them.
    let mut data = DataLoader::new(examples(), 8, 11, 258);
    let bf16 = model(&device)
        .with_compute_dtype(ComputeDtype::Bf16)
        .unwrap();
    let mut learner = Learner::new(bf16, learner_config(1, 1)).unwrap();
    assert!(learner.loss_scaler().is_none());
    assert!(learner.set_loss_scaler(LossScaler::default()).is_err());
    assert_eq!(learner.train_step(&mut data).unwrap().loss_scale, None);
}
