//! The required test cases of method.md §14.1, against the public API.
//!
//! Tolerances: integer goldens are exact (every intermediate is a small integer, exactly
//! representable in f32). Random cases use entries of size ~1 accumulated over at most a few
//! dozen terms; f32 rounding then stays below ~1e-5 absolute, so 1e-5 is used, and 2e-5 for the
//! BAT inverse, whose f32 rounding of `(I + D)⁻¹` adds a second pass.

mod common;

use burn::module::Module;
use burn::tensor::{DType, Tensor};
use common::*;
use disha_core::{
    AdaptedLinear, Adapter, AdapterInit, AdapterSpec, BatOrientation, DishaError, miss_to_lora,
};

/// `t` on `dev`, with `dev`'s autodiff setting.
fn on<const D: usize>(t: Tensor<D>, dev: &burn::tensor::Device) -> Tensor<D> {
    if dev.is_autodiff() { t.autodiff() } else { t }
}

/// A layer with PyTorch-layout weight `w` ([out, in]).
fn layer(w: &Mat) -> AdaptedLinear {
    AdaptedLinear::from_weights(to_tensor(&w.t()), None).with_label("test")
}

/// Forward of a single batch `x` ([M, in]) → [M, out].
fn forward(l: &AdaptedLinear, x: &Mat) -> Mat {
    to_mat(l.forward(to_tensor(x)))
}

/// Current stored weight in PyTorch layout.
fn weight(l: &AdaptedLinear) -> Mat {
    to_mat(l.weight.val()).t()
}

/// Replaces the tensors of adapter `name` with seeded N(0, std²) values.
fn randomize(l: &mut AdaptedLinear, name: &str, std: f64, seed: u64) {
    let tensors = l
        .adapter(name)
        .unwrap()
        .peft_tensors()
        .into_iter()
        .enumerate()
        .map(|(k, (_, t))| {
            let [a, b, c] = t.dims();
            let m = randn(a * b, c, std, seed * 7 + k as u64);
            to_tensor(&m).reshape([a, b, c])
        })
        .collect();
    l.load_adapter_tensors(name, tensors).unwrap();
}

fn all_specs(d_input: usize, d_output: usize, r: usize) -> Vec<AdapterSpec> {
    let mut specs = vec![AdapterSpec::bone(r), AdapterSpec::lora(r, 2.0 * r as f64)];
    let mini_r = (1..=d_output)
        .rev()
        .find(|m| d_output.is_multiple_of(*m) && *m < d_output)
        .unwrap_or(1);
    specs.push(AdapterSpec::mini(r, mini_r));
    if d_input.is_multiple_of(r) && d_output.is_multiple_of(r) {
        specs.push(AdapterSpec::bat(r, BatOrientation::Peft));
        specs.push(AdapterSpec::bat(r, BatOrientation::RwkvPeft));
    }
    specs
}

// 1. Shapes and validation.
#[test]
fn t01_shapes_and_validation() {
    let (d_in, d_out) = (12, 8);
    let mut l = layer(&Mat::zeros(d_out, d_in));
    let cases = [
        (AdapterSpec::bone(4), vec![vec![4, 8]]),
        (
            AdapterSpec::bat(4, BatOrientation::Peft),
            vec![vec![2, 4, 4]],
        ),
        (
            AdapterSpec::bat(4, BatOrientation::RwkvPeft),
            vec![vec![3, 4, 4]],
        ),
        (AdapterSpec::mini(4, 2), vec![vec![4, 2]]),
        (AdapterSpec::lora(4, 8.0), vec![vec![4, 12], vec![8, 4]]),
    ];
    for (i, (spec, shapes)) in cases.into_iter().enumerate() {
        let name = format!("a{i}");
        l.add_adapter(&name, &spec).unwrap();
        let actual: Vec<Vec<usize>> = l
            .adapter(&name)
            .unwrap()
            .peft_tensors()
            .into_iter()
            .map(|(_, t)| {
                let d = t.dims();
                if shapes[0].len() == 3 {
                    d.to_vec()
                } else {
                    d[1..].to_vec()
                }
            })
            .collect();
        assert_eq!(actual, shapes, "{}", spec.method_name());
    }
    let err = |spec: AdapterSpec, d_in: usize, d_out: usize| {
        layer(&Mat::zeros(d_out, d_in))
            .add_adapter("x", &spec)
            .unwrap_err()
    };
    assert!(matches!(
        err(AdapterSpec::bone(0), 4, 4),
        DishaError::InvalidRank { .. }
    ));
    assert!(matches!(
        err(AdapterSpec::bat(4, BatOrientation::Peft), 10, 8),
        DishaError::BatNotDivisible { .. }
    ));
    assert!(matches!(
        err(AdapterSpec::bat(4, BatOrientation::RwkvPeft), 8, 10),
        DishaError::BatNotDivisible { .. }
    ));
    assert!(matches!(
        err(AdapterSpec::mini(2, 3), 4, 8),
        DishaError::MiniNotDivisible { .. }
    ));
    let e = err(AdapterSpec::bone(5), 4, 8);
    assert!(matches!(e, DishaError::RankExceedsInput { .. }));
    assert!(e.to_string().contains("layer `test` [in=4, out=8]"), "{e}");
}

// 2. Zero init is a no-op for every mode; merge leaves W unchanged.
#[test]
fn t02_zero_init_is_an_exact_no_op() {
    let w = randn(8, 12, 1.0, 1);
    let x = randn(5, 12, 1.0, 2);
    let base = forward(&layer(&w), &x);
    for spec in all_specs(12, 8, 4) {
        let mut l = layer(&w);
        l.add_adapter("z", &spec).unwrap();
        assert_eq!(forward(&l, &x), base, "{} forward", spec.method_name());
        l.merge().unwrap();
        assert_eq!(weight(&l), w, "{} merged weight", spec.method_name());
    }
}

// Merge / unmerge produce new tensors; a weight the caller still holds is never modified.
#[test]
fn t02b_merge_never_mutates_the_callers_tensors() {
    let w = randn(8, 12, 1.0, 3);
    let held = to_tensor(&w.t());
    for spec in all_specs(12, 8, 4) {
        let mut l = AdaptedLinear::from_weights(held.clone(), None);
        l.add_adapter("a", &spec).unwrap();
        randomize(&mut l, "a", 0.1, 4);
        let adapter_before = to_mat(
            l.adapter("a").unwrap().peft_tensors()[0]
                .1
                .clone()
                .reshape([1, -1]),
        );
        l.merge().unwrap();
        l.unmerge().unwrap();
        assert_eq!(
            to_mat(held.clone()).t(),
            w,
            "{}: caller's weight",
            spec.method_name()
        );
        let adapter_after = to_mat(
            l.adapter("a").unwrap().peft_tensors()[0]
                .1
                .clone()
                .reshape([1, -1]),
        );
        assert_eq!(
            adapter_after,
            adapter_before,
            "{}: adapter",
            spec.method_name()
        );
    }
}

// A LoRA adapter whose scale disagrees with the spec it is inserted under is refused.
#[test]
fn t02c_insert_adapter_checks_the_lora_scale() {
    let w = randn(8, 12, 1.0, 3);
    let mut l = layer(&w);
    let lora = miss_to_lora(
        &{
            let mut b = layer(&w);
            b.add_adapter("b", &AdapterSpec::bone(4)).unwrap();
            b.adapter("b").unwrap().clone()
        },
        12,
        8,
    )
    .unwrap();
    let e = l
        .insert_adapter("l", AdapterSpec::lora(4, 8.0), Adapter::Lora(lora))
        .unwrap_err();
    assert!(e.to_string().contains("scale"), "{e}");
}

// 3. Forward equals explicit ΔW, golden G1 exactly, both layouts; merged forward agrees.
#[test]
fn t03_golden_g1() {
    let w = Mat::from_fn(3, 5, |o, i| (5 * o + i) as f64);
    let b = Mat::from_rows(&[&[1., 2., 3.], &[10., 20., 30.]]);
    let x = Mat::from_rows(&[&[1., 2., 3., 4., 5.]]);
    let mut l = layer(&w);
    l.add_adapter("g1", &AdapterSpec::bone(2)).unwrap();
    l.load_adapter_tensors("g1", vec![to_tensor(&b).unsqueeze()])
        .unwrap();
    let delta_b = to_mat(l.delta_weight("g1").unwrap());
    let expected_b = Mat::from_rows(&[
        &[1., 2., 3.],
        &[10., 20., 30.],
        &[1., 2., 3.],
        &[10., 20., 30.],
        &[1., 2., 3.],
    ]);
    assert_eq!(delta_b, expected_b, "ΔW_B (Burn layout)");
    let expected_pt = Mat::from_rows(&[
        &[1., 10., 1., 10., 1.],
        &[2., 20., 2., 20., 2.],
        &[3., 30., 3., 30., 3.],
    ]);
    assert_eq!(delta_b.t(), expected_pt, "ΔW (PyTorch layout)");
    assert_eq!(
        forward(&layer(&w), &x),
        Mat::from_rows(&[&[40., 115., 190.]])
    );
    let y = Mat::from_rows(&[&[109., 253., 397.]]);
    assert_eq!(forward(&l, &x), y, "unmerged");
    l.merge().unwrap();
    assert_eq!(weight(&l), w.add(&expected_pt));
    assert_eq!(forward(&l, &x), y, "merged");
}

// 4. Merge → forward equals the unmerged forward, all modes, method.md's shapes.
#[test]
fn t04_merged_forward_equals_unmerged() {
    for (seed, (d_out, d_in, r)) in [(20, 10, 2), (7, 10, 4), (6, 5, 3), (8, 12, 4)]
        .into_iter()
        .enumerate()
    {
        let seed = seed as u64 * 10;
        let w = randn(d_out, d_in, 1.0, seed);
        let x = randn(6, d_in, 1.0, seed + 1);
        for spec in all_specs(d_in, d_out, r) {
            let mut l = layer(&w);
            l.add_adapter("a", &spec).unwrap();
            randomize(&mut l, "a", 0.1, seed + 2);
            let unmerged = forward(&l, &x);
            assert!(
                unmerged.max_abs_diff(&forward(&layer(&w), &x)) > 1e-3,
                "adapter is active"
            );
            l.merge().unwrap();
            let merged = forward(&l, &x);
            let diff = unmerged.max_abs_diff(&merged);
            assert!(
                diff < 1e-5,
                "{} ({d_out},{d_in},r={r}): {diff}",
                spec.method_name()
            );
        }
    }
}

// 5. Unmerge recovers W.
#[test]
fn t05_unmerge_recovers_w() {
    for (d_out, d_in, r) in [(20, 10, 2), (7, 10, 4), (6, 5, 3), (8, 12, 4)] {
        let w = randn(d_out, d_in, 1.0, 5);
        for spec in all_specs(d_in, d_out, r) {
            let mut l = layer(&w);
            l.add_adapter("a", &spec).unwrap();
            randomize(&mut l, "a", 0.1, 6);
            l.merge().unwrap();
            assert!(weight(&l).max_abs_diff(&w) > 1e-3);
            l.unmerge().unwrap();
            let tol = if spec.method_name().starts_with("bat") {
                2e-5
            } else {
                1e-6
            };
            let diff = weight(&l).max_abs_diff(&w);
            assert!(
                diff < tol,
                "{} ({d_out},{d_in},r={r}): {diff}",
                spec.method_name()
            );
        }
    }
}

fn g3_layer(orientation: BatOrientation) -> AdaptedLinear {
    let w = Mat::from_fn(4, 4, |o, i| (4 * o + i) as f64);
    let d0 = Mat::from_rows(&[&[1., 0.], &[0., 0.]]);
    let d1 = Mat::from_rows(&[&[0., 0.], &[0., 1.]]);
    let mut l = layer(&w);
    l.add_adapter("g3", &AdapterSpec::bat(2, orientation))
        .unwrap();
    l.load_adapter_tensors("g3", vec![to_tensor3(&[d0, d1])])
        .unwrap();
    l
}

// 6. BAT orientation: golden G3, and block locality.
#[test]
fn t06_bat_orientations_golden_g3_and_locality() {
    let peft = to_mat(g3_layer(BatOrientation::Peft).delta_weight("g3").unwrap());
    let expected = Mat::from_rows(&[
        &[1., 0., 3., 0.],
        &[4., 0., 6., 0.],
        &[0., 9., 0., 11.],
        &[0., 14., 0., 16.],
    ]);
    assert_eq!(peft.t(), expected, "PEFT orientation, PyTorch layout");
    assert_eq!(
        peft,
        Mat::from_rows(&[
            &[1., 4., 0., 0.],
            &[0., 0., 9., 14.],
            &[3., 6., 0., 0.],
            &[0., 0., 11., 16.]
        ]),
        "PEFT orientation, Burn layout"
    );
    let rwkv = to_mat(
        g3_layer(BatOrientation::RwkvPeft)
            .delta_weight("g3")
            .unwrap(),
    );
    let expected = Mat::from_rows(&[
        &[1., 0., 0., 3.],
        &[4., 0., 0., 8.],
        &[9., 0., 0., 11.],
        &[12., 0., 0., 16.],
    ]);
    assert_eq!(rwkv.t(), expected, "RWKV-PEFT orientation, PyTorch layout");
    assert_eq!(
        rwkv,
        Mat::from_rows(&[
            &[1., 4., 9., 12.],
            &[0., 0., 0., 0.],
            &[0., 0., 0., 0.],
            &[3., 8., 11., 16.]
        ]),
        "RWKV-PEFT orientation, Burn layout"
    );

    // Only D[1] != 0: PEFT changes only output-block row 1 (rows 2..4 of W); RWKV-PEFT only
    // input-block column 1 (columns 2..4 of W).
    let w = randn(8, 8, 1.0, 7);
    let mut d = vec![Mat::zeros(2, 2); 4];
    d[1] = randn(2, 2, 0.5, 8);
    for (orientation, rwkv) in [
        (BatOrientation::Peft, false),
        (BatOrientation::RwkvPeft, true),
    ] {
        let mut l = layer(&w);
        l.add_adapter("a", &AdapterSpec::bat(2, orientation))
            .unwrap();
        l.load_adapter_tensors("a", vec![to_tensor3(&d)]).unwrap();
        let delta = to_mat(l.delta_weight("a").unwrap()).t();
        for o in 0..8 {
            for i in 0..8 {
                let inside = if rwkv {
                    (2..4).contains(&i)
                } else {
                    (2..4).contains(&o)
                };
                assert_eq!(delta.at(o, i) != 0.0, inside, "{orientation:?} ({o},{i})");
            }
        }
        let reference = bat_merge(&w, &d, rwkv).sub(&w);
        assert!(delta.max_abs_diff(&reference) < 1e-5);
    }
}

// 7. Mini: golden G2; mini_r = out equals standard.
#[test]
fn t07_mini_golden_g2_and_full_width_equals_bone() {
    let mut l = layer(&Mat::zeros(4, 4));
    l.add_adapter("m", &AdapterSpec::mini(2, 2)).unwrap();
    let bm = Mat::from_rows(&[&[1., 2.], &[3., 4.]]);
    l.load_adapter_tensors("m", vec![to_tensor(&bm).unsqueeze()])
        .unwrap();
    let delta = to_mat(l.delta_weight("m").unwrap());
    assert_eq!(
        delta.t(),
        Mat::from_rows(&[
            &[1., 3., 1., 3.],
            &[2., 4., 2., 4.],
            &[1., 3., 1., 3.],
            &[2., 4., 2., 4.]
        ])
    );
    assert_eq!(
        delta,
        Mat::from_rows(&[
            &[1., 2., 1., 2.],
            &[3., 4., 3., 4.],
            &[1., 2., 1., 2.],
            &[3., 4., 3., 4.]
        ])
    );

    let w = randn(6, 7, 1.0, 9);
    let x = randn(3, 7, 1.0, 10);
    let b = randn(3, 6, 0.1, 11);
    let mut bone = layer(&w);
    bone.add_adapter("b", &AdapterSpec::bone(3)).unwrap();
    bone.load_adapter_tensors("b", vec![to_tensor(&b).unsqueeze()])
        .unwrap();
    let mut mini = layer(&w);
    mini.add_adapter("m", &AdapterSpec::mini(3, 6)).unwrap();
    mini.load_adapter_tensors("m", vec![to_tensor(&b).unsqueeze()])
        .unwrap();
    assert!(forward(&bone, &x).max_abs_diff(&forward(&mini, &x)) < 1e-6);
    assert_eq!(
        to_mat(bone.delta_weight("b").unwrap()),
        to_mat(mini.delta_weight("m").unwrap())
    );
}

// 8. LoRA equivalence of Bone and mini.
#[test]
fn t08_lora_factorisation_is_exact() {
    let (d_out, d_in, r) = (6, 7, 3);
    let w = randn(d_out, d_in, 1.0, 12);
    let x = randn(4, d_in, 1.0, 13);
    for spec in [AdapterSpec::bone(r), AdapterSpec::mini(r, 2)] {
        let mut l = layer(&w);
        l.add_adapter("a", &spec).unwrap();
        randomize(&mut l, "a", 0.1, 14);
        let lora = miss_to_lora(l.adapter("a").unwrap(), d_in, d_out).unwrap();
        // lora_A[j, i] = [i mod r = j], scale 1.
        let a = to_mat(lora.lora_a.val());
        assert_eq!(
            a,
            Mat::from_fn(r, d_in, |j, i| f64::from(u8::from(i % r == j)))
        );
        assert_eq!(lora.scale, 1.0);
        let lora_delta = to_mat(lora.delta_weight());
        let miss_delta = to_mat(l.delta_weight("a").unwrap());
        assert!(
            lora_delta.max_abs_diff(&miss_delta) < 1e-6,
            "{}",
            spec.method_name()
        );
        let mut as_lora = layer(&w);
        as_lora
            .insert_adapter("l", AdapterSpec::lora(r, r as f64), Adapter::Lora(lora))
            .unwrap();
        assert!(forward(&as_lora, &x).max_abs_diff(&forward(&l, &x)) < 1e-5);
    }
    let mut bat = layer(&Mat::zeros(4, 4));
    bat.add_adapter("b", &AdapterSpec::bat(2, BatOrientation::Peft))
        .unwrap();
    assert!(miss_to_lora(bat.adapter("b").unwrap(), 4, 4).is_err());
}

// 9. Multi-adapter semantics.
#[test]
fn t09_multi_adapter_semantics() {
    let w = randn(8, 12, 1.0, 15);
    let x = randn(5, 12, 1.0, 16);
    // Additive adapters commute.
    let mut l = layer(&w);
    for (name, spec) in [
        ("bone", AdapterSpec::bone(4)),
        ("mini", AdapterSpec::mini(4, 2)),
        ("lora", AdapterSpec::lora(2, 4.0)),
    ] {
        l.add_adapter(name, &spec).unwrap();
        randomize(&mut l, name, 0.1, 17);
    }
    assert_eq!(
        l.active_adapters(),
        ["bone"],
        "only the first adapter starts active"
    );
    l.set_active_adapters(&["bone", "mini", "lora"]).unwrap();
    let abc = forward(&l, &x);
    l.set_active_adapters(&["lora", "bone", "mini"]).unwrap();
    assert!(forward(&l, &x).max_abs_diff(&abc) < 1e-6);
    // ... and equal the sum of their single contributions.
    let base = forward(&layer(&w), &x);
    let mut sum = base.clone();
    for name in ["bone", "mini", "lora"] {
        l.set_active_adapters(&[name]).unwrap();
        sum = sum.add(&forward(&l, &x).sub(&base));
    }
    assert!(sum.max_abs_diff(&abc) < 1e-5);

    // BAT adapters compose sequentially, so order matters; LIFO unmerge restores W.
    let mut l = layer(&w);
    let mut ds = Vec::new();
    for (name, seed) in [("p", 18), ("q", 19)] {
        l.add_adapter(name, &AdapterSpec::bat(4, BatOrientation::Peft))
            .unwrap();
        randomize(&mut l, name, 0.1, seed);
        let t = l.adapter(name).unwrap().peft_tensors().remove(0).1;
        ds.push(
            (0..2)
                .map(|k| to_mat(t.clone().narrow(0, k, 1).squeeze_dim(0)))
                .collect::<Vec<_>>(),
        );
    }
    l.set_active_adapters(&["p", "q"]).unwrap();
    let pq = forward(&l, &x);
    let reference = x.matmul(&bat_merge(&bat_merge(&w, &ds[0], false), &ds[1], false).t());
    assert!(pq.max_abs_diff(&reference) < 1e-4, "sequential composition");
    l.set_active_adapters(&["q", "p"]).unwrap();
    let qp = forward(&l, &x);
    assert!(pq.max_abs_diff(&qp) > 1e-4, "order-dependent");
    l.set_active_adapters(&["p", "q"]).unwrap();
    l.merge().unwrap();
    assert_eq!(l.merged_adapters(), ["p", "q"]);
    assert!(forward(&l, &x).max_abs_diff(&pq) < 1e-5);
    l.unmerge().unwrap();
    assert!(weight(&l).max_abs_diff(&w) < 2e-5);

    // Mixed BAT + Bone: merged and unmerged forwards agree whatever the activation order.
    let mut l = layer(&w);
    l.add_adapter("bone", &AdapterSpec::bone(4)).unwrap();
    l.add_adapter("bat", &AdapterSpec::bat(4, BatOrientation::RwkvPeft))
        .unwrap();
    randomize(&mut l, "bone", 0.1, 20);
    randomize(&mut l, "bat", 0.1, 21);
    l.set_active_adapters(&["bone", "bat"]).unwrap();
    let unmerged = forward(&l, &x);
    l.merge().unwrap();
    assert!(forward(&l, &x).max_abs_diff(&unmerged) < 1e-5);
    l.unmerge().unwrap();
    assert!(weight(&l).max_abs_diff(&w) < 2e-5);
}

// 9b. Checked state transitions.
#[test]
fn t09b_state_transitions_are_checked() {
    let w = randn(4, 4, 1.0, 22);
    let mut l = layer(&w);
    assert!(
        matches!(l.merge(), Err(DishaError::InvalidState { .. })),
        "no adapter"
    );
    l.add_adapter("a", &AdapterSpec::bone(2)).unwrap();
    assert!(matches!(
        l.add_adapter("a", &AdapterSpec::bone(2)),
        Err(DishaError::AdapterExists { .. })
    ));
    assert!(
        matches!(l.unmerge(), Err(DishaError::InvalidState { .. })),
        "unmerge unmerged"
    );
    l.merge().unwrap();
    let e = l.merge().unwrap_err();
    assert!(e.to_string().contains("already merged"), "{e}");
    assert!(
        l.set_active_adapters(&["a"]).is_err(),
        "change active while merged"
    );
    assert!(l.delete_adapter("a").is_err(), "delete merged");
    assert!(matches!(
        l.set_active_adapters(&["nope"]),
        Err(DishaError::AdapterNotFound { .. })
    ));
    // Disabling a merged layer unmerges it.
    l.disable_adapters().unwrap();
    assert!(!l.is_merged());
    assert_eq!(weight(&l), w);
    let x = randn(2, 4, 1.0, 23);
    assert_eq!(forward(&l, &x), forward(&layer(&w), &x));
    l.enable_adapters();
    l.delete_adapter("a").unwrap();
    assert!(l.adapter_names().is_empty());
}

// BAT unmerge refuses a singular I + D.
#[test]
fn t09c_singular_bat_unmerge_is_an_error_and_keeps_weights() {
    let w = randn(4, 4, 1.0, 24);
    let mut l = layer(&w);
    l.add_adapter("s", &AdapterSpec::bat(2, BatOrientation::Peft))
        .unwrap();
    // D[1] = -I makes I + D[1] = 0.
    let d = vec![Mat::zeros(2, 2), Mat::identity(2).scale(-1.0)];
    l.load_adapter_tensors("s", vec![to_tensor3(&d)]).unwrap();
    l.merge().unwrap();
    let merged = weight(&l);
    let e = l.unmerge().unwrap_err();
    assert!(
        matches!(e, DishaError::SingularBlock { block: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("layer `test`, adapter `s`"), "{e}");
    assert_eq!(weight(&l), merged, "weights unchanged");
    assert!(l.is_merged());
}

// 10. Dropout: train vs eval, merge independent of dropout.
#[test]
fn t10_dropout_acts_only_in_training() {
    let w = randn(8, 16, 1.0, 25);
    let x = randn(32, 16, 1.0, 26);
    let train = device().autodiff();
    let build = |p: f64, dev: &burn::tensor::Device| {
        let mut l = AdaptedLinear::from_weights(on(to_tensor(&w.t()), dev), None);
        l.add_adapter("d", &AdapterSpec::bone(4).with_dropout(p))
            .unwrap();
        randomize(&mut l, "d", 0.5, 27);
        l
    };
    let with = build(0.5, &train);
    let without = build(0.0, &train);
    let run = |l: &AdaptedLinear, dev: &burn::tensor::Device| {
        to_mat(l.forward(on(to_tensor(&x), dev)).inner())
    };
    let reference = run(&without, &train);
    assert!(
        run(&with, &train).max_abs_diff(&reference) > 1e-3,
        "dropout active in training"
    );
    // Eval mode (`valid()`: inner device, training flags off) is deterministic and dropout-free.
    let eval = with.valid();
    let diff = run(&eval, &device()).max_abs_diff(&reference);
    assert!(
        diff < 1e-6,
        "eval output differs from the dropout-free output by {diff}"
    );
    let merged = |l: &AdaptedLinear| to_mat(l.merged_weight());
    assert_eq!(merged(&with), merged(&without), "merge ignores dropout");
}

// 11. Gradients match method.md §8; the base gets none.
#[test]
fn t11_gradients_match_the_analytic_formulas() {
    let (d_out, d_in, r, m) = (8, 12, 4, 6);
    let w = randn(d_out, d_in, 1.0, 28);
    let x = randn(m, d_in, 1.0, 29);
    let g = randn(m, d_out, 1.0, 30); // δY: L = Σ y ⊙ g
    let specs = [
        AdapterSpec::bone(r),
        AdapterSpec::mini(r, 2),
        AdapterSpec::bat(r, BatOrientation::Peft),
        AdapterSpec::bat(r, BatOrientation::RwkvPeft),
        AdapterSpec::lora(r, 8.0),
    ];
    for spec in specs {
        let mut l = AdaptedLinear::from_weights(to_tensor(&w.t()).autodiff(), None);
        l.add_adapter("a", &spec).unwrap();
        randomize(&mut l, "a", 0.1, 31);
        let params = l.adapter("a").unwrap().peft_tensors();
        let y = l.forward(to_tensor(&x).autodiff().require_grad());
        let grads = (y * to_tensor(&g).autodiff()).sum().backward();
        assert!(
            l.weight.val().grad(&grads).is_none(),
            "frozen base has no gradient"
        );
        let grad_of = |k: usize| -> Tensor<3> {
            match (l.adapter("a").unwrap(), k) {
                (Adapter::Bone(a) | Adapter::Mini(a), 0) => {
                    a.block.val().grad(&grads).map(|g| g.unsqueeze())
                }
                (Adapter::Bat(a), 0) => a.blocks.val().grad(&grads),
                (Adapter::Lora(a), 0) => a.lora_a.val().grad(&grads).map(|g| g.unsqueeze()),
                (Adapter::Lora(a), 1) => a.lora_b.val().grad(&grads).map(|g| g.unsqueeze()),
                _ => unreachable!(),
            }
            .expect("adapter gradient")
        };
        let name = spec.method_name();
        match name {
            "bone" | "mini" => {
                // ∂L/∂B_full = Sᵀ·δY; mini sums the tiles of each column class.
                let full = shard_sum(&x, r).t().matmul(&g);
                let c = params[0].1.dims()[2];
                let expected = Mat::from_fn(r, c, |j, q| {
                    (0..d_out)
                        .filter(|o| o % c == q)
                        .map(|o| full.at(j, o))
                        .sum()
                });
                let got = to_mat(grad_of(0).squeeze_dim(0));
                assert!(
                    got.max_abs_diff(&expected) < 1e-4,
                    "{name}: {}",
                    got.max_abs_diff(&expected)
                );
            }
            "bat" | "bat-rwkv" => {
                let rwkv = name == "bat-rwkv";
                let gw = g.t().matmul(&x); // G = δYᵀX, [out, in]
                let k = if rwkv { d_in / r } else { d_out / r };
                let got = grad_of(0);
                for kk in 0..k {
                    let mut expected = Mat::zeros(r, r);
                    let others = if rwkv { d_out / r } else { d_in / r };
                    for o in 0..others {
                        let (a, b) = if rwkv { (o, kk) } else { (kk, o) };
                        let term = w
                            .block(a, b, r)
                            .add(&Mat::identity(r))
                            .t()
                            .matmul(&gw.block(a, b, r));
                        expected = expected.add(&term);
                    }
                    let got_k = to_mat(got.clone().narrow(0, kk, 1).squeeze_dim(0));
                    let diff = got_k.max_abs_diff(&expected);
                    assert!(
                        diff < 1e-4 * expected.max_abs().max(1.0),
                        "{name} D[{kk}]: {diff}"
                    );
                }
            }
            "lora" => {
                let s = spec.scale();
                let a = to_mat(params[0].1.clone().squeeze_dim(0)); // [r, in]
                let b = to_mat(params[1].1.clone().squeeze_dim(0)); // [out, r]
                let h = x.matmul(&a.t());
                let db = g.t().matmul(&h).scale(s);
                let dh = g.matmul(&b).scale(s);
                let da = dh.t().matmul(&x);
                assert!(
                    to_mat(grad_of(0).squeeze_dim(0)).max_abs_diff(&da) < 1e-4,
                    "lora A"
                );
                assert!(
                    to_mat(grad_of(1).squeeze_dim(0)).max_abs_diff(&db) < 1e-4,
                    "lora B"
                );
            }
            other => unreachable!("{other}"),
        }
    }
}

// 12. Dtype: bf16 base, f32 adapter.
#[test]
fn t12_bf16_base_with_f32_adapter() {
    let w = randn(8, 12, 1.0, 32);
    let x = randn(3, 12, 1.0, 33);
    for spec in [
        AdapterSpec::bone(4),
        AdapterSpec::bat(4, BatOrientation::Peft),
    ] {
        let mut l = AdaptedLinear::from_weights(to_tensor(&w.t()).cast(DType::BF16), None);
        l.add_adapter("a", &spec).unwrap();
        randomize(&mut l, "a", 0.1, 34);
        assert_eq!(
            l.adapter("a").unwrap().peft_tensors()[0].1.dtype(),
            DType::F32
        );
        let y = l.forward(to_tensor(&x).cast(DType::BF16));
        assert_eq!(y.dtype(), DType::BF16, "output in the input dtype");
        // Reference in f32 on the bf16-rounded weight; bf16 output rounding is ~2^-8 relative.
        let mut l32 = AdaptedLinear::from_weights(l.weight.val().cast(DType::F32), None);
        l32.insert_adapter("a", spec.clone(), l.adapter("a").unwrap().clone())
            .unwrap();
        let y32 = to_mat(l32.forward(to_tensor(&x).cast(DType::BF16).cast(DType::F32)));
        let diff = to_mat(y.cast(DType::F32)).max_abs_diff(&y32);
        assert!(
            diff < 0.05 * y32.max_abs().max(1.0),
            "{}: {diff}",
            spec.method_name()
        );
        l.merge().unwrap();
        assert_eq!(
            l.weight.val().dtype(),
            DType::BF16,
            "merged weight in base dtype"
        );
    }
}

// 12b. A bf16 / f16 base under f32 compute (the input stays f32): the same bits as an f32 base
// holding the rounded weights, in the output, the input gradient and every adapter gradient —
// the base is upcast exactly, and the products are the same f32 products.
#[test]
fn t12b_half_base_under_f32_compute_is_exact() {
    let (d_out, d_in, r, m) = (8, 12, 4, 5);
    let w = randn(d_out, d_in, 1.0, 40);
    let x = randn(m, d_in, 1.0, 41);
    let g = randn(m, d_out, 1.0, 42);
    let bias = randn(1, d_out, 1.0, 43);
    for dtype in [DType::BF16, DType::F16] {
        for spec in all_specs(d_in, d_out, r) {
            let run = |base_dtype: DType| {
                let weight = to_tensor(&w.t()).cast(dtype).cast(base_dtype).autodiff();
                let b = to_tensor(&bias).reshape([d_out]).autodiff();
                let mut l = AdaptedLinear::from_weights(weight, Some(b));
                l.add_adapter("a", &spec).unwrap();
                randomize(&mut l, "a", 0.1, 44);
                let input = to_tensor(&x).autodiff().require_grad();
                let y = l.forward(input.clone());
                assert_eq!(y.dtype(), DType::F32);
                let grads = (y.clone() * to_tensor(&g).autodiff()).sum().backward();
                let adapter_grads = adapter_gradients(&l, "a", &grads);
                assert_eq!(
                    l.weight.val().dtype(),
                    base_dtype,
                    "the base keeps its dtype"
                );
                let dx = to_mat(input.grad(&grads).unwrap());
                (to_mat(y.inner()), dx, adapter_grads)
            };
            let (y_half, dx_half, ga_half) = run(dtype);
            let (y_f32, dx_f32, ga_f32) = run(DType::F32);
            let name = format!("{dtype:?} {}", spec.method_name());
            assert_eq!(y_half.max_abs_diff(&y_f32), 0.0, "{name}: output");
            assert_eq!(dx_half.max_abs_diff(&dx_f32), 0.0, "{name}: input gradient");
            for (a, b) in ga_half.iter().zip(&ga_f32) {
                assert_eq!(a.max_abs_diff(b), 0.0, "{name}: adapter gradient");
            }
        }
    }
}

/// The gradients of adapter `name`'s tensors (a BAT's blocks stacked into one matrix).
fn adapter_gradients(l: &AdaptedLinear, name: &str, grads: &burn::tensor::Gradients) -> Vec<Mat> {
    let grad = |t: Tensor<2>| to_mat(t.grad(grads).expect("adapter gradient"));
    match l.adapter(name).unwrap() {
        Adapter::Bone(a) | Adapter::Mini(a) => vec![grad(a.block.val())],
        Adapter::Bat(a) => {
            let [k, r, c] = a.blocks.dims();
            let g = a.blocks.val().grad(grads).expect("adapter gradient");
            vec![to_mat(g.reshape([k * r, c]))]
        }
        Adapter::Lora(a) => vec![grad(a.lora_a.val()), grad(a.lora_b.val())],
    }
}

// 12c. A block-quantized base (Q8 / Q4 / Q4_1) computes what a dense f32 base holding the dequantized
// weights computes: output, input gradient and adapter gradients. The input width 72 is 2¼
// quantization blocks (a ragged last block). Tolerance 1e-5: both sides multiply the same f32
// values; the quantized side dequantizes in blocks and may sum in another order.
#[test]
fn t12c_quantized_base_matches_its_dequantized_dense_base() {
    use disha_core::QuantFormat;
    let (d_out, d_in, r, m) = (8, 72, 4, 5);
    let w = randn(d_out, d_in, 1.0, 50);
    let x = randn(m, d_in, 1.0, 51);
    let g = randn(m, d_out, 1.0, 52);
    let bias = randn(1, d_out, 1.0, 53);
    for format in [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::Q4_1] {
        for spec in all_specs(d_in, d_out, r) {
            let run = |quantized: bool| {
                let b = to_tensor(&bias).reshape([d_out]).autodiff();
                let mut l = AdaptedLinear::from_weights(to_tensor(&w.t()).autodiff(), Some(b));
                l.quantize_base(format).unwrap();
                if !quantized {
                    let dense = l.dense_base_weight();
                    let b = l.bias.as_ref().map(|b| b.val());
                    l = AdaptedLinear::from_weights(dense, b);
                }
                assert_eq!(l.quantized.is_some(), quantized);
                l.add_adapter("a", &spec).unwrap();
                randomize(&mut l, "a", 0.1, 54);
                let input = to_tensor(&x).autodiff().require_grad();
                let y = l.forward(input.clone());
                let grads = (y.clone() * to_tensor(&g).autodiff()).sum().backward();
                let adapter_grads = adapter_gradients(&l, "a", &grads);
                let dx = to_mat(input.grad(&grads).unwrap());
                (to_mat(y.inner()), dx, adapter_grads, l)
            };
            let (y_q, dx_q, ga_q, l_q) = run(true);
            let (y_d, dx_d, ga_d, l_d) = run(false);
            let name = format!("{format:?} {}", spec.method_name());
            assert!(y_q.max_abs_diff(&y_d) <= 1e-5, "{name}: output");
            assert!(dx_q.max_abs_diff(&dx_d) <= 1e-5, "{name}: input gradient");
            for (a, b) in ga_q.iter().zip(&ga_d) {
                assert!(a.max_abs_diff(b) <= 1e-5, "{name}: adapter gradient");
            }
            // Quantization changed the weights (the test compares two quantized bases, not
            // two f32 ones).
            assert!(
                to_mat(l_d.weight.val()).t().max_abs_diff(&w) > 1e-4,
                "{name}"
            );
            // The merged weight is the dense one; merging in place is refused, naming the layer.
            let merged_q = to_mat(l_q.merged_weight());
            assert!(
                merged_q.max_abs_diff(&to_mat(l_d.merged_weight())) <= 1e-6,
                "{name}"
            );
            let mut l_q = l_q.with_label("layers.0.q_proj");
            let err = l_q.merge().unwrap_err().to_string();
            assert!(
                err.contains("layers.0.q_proj") && err.contains("quantized"),
                "{err}"
            );
            assert_eq!(l_q.d_input(), d_in);
            assert_eq!(l_q.d_output(), d_out);
        }
    }
}

// 15. RWKV-PEFT merge parity (merge_disha.py): 2-D Bone with a partial chunk, 3-D Bat-Row.
#[test]
fn t15_rwkv_peft_merge_parity() {
    // Bone: W[o, i] += D[i mod r, o], out = 6, in = 7, r = 3 (one partial chunk of 1).
    let w = randn(6, 7, 1.0, 35);
    let d = randn(3, 6, 0.1, 36);
    let mut l = layer(&w);
    l.add_adapter("disha", &AdapterSpec::bone(3)).unwrap();
    l.load_adapter_tensors("disha", vec![to_tensor(&d).unsqueeze()])
        .unwrap();
    l.merge().unwrap();
    let mut reference = w.clone();
    for o in 0..6 {
        for i in 0..7 {
            reference.set(o, i, w.at(o, i) + d.at(i % 3, o));
        }
    }
    assert!(weight(&l).max_abs_diff(&reference) < 1e-6);
    // Bat-Row: W_ab += W_ab·D[b] + D[b], D: [in/r, r, r].
    let w = randn(4, 6, 1.0, 37);
    let ds: Vec<Mat> = (0..3).map(|b| randn(2, 2, 0.1, 38 + b)).collect();
    let mut l = layer(&w);
    l.add_adapter("disha", &AdapterSpec::bat(2, BatOrientation::RwkvPeft))
        .unwrap();
    l.load_adapter_tensors("disha", vec![to_tensor3(&ds)])
        .unwrap();
    l.merge().unwrap();
    let mut reference = w.clone();
    for a in 0..2 {
        for (b, d) in ds.iter().enumerate() {
            let blk = w.block(a, b, 2);
            let new = blk.add(&blk.matmul(d)).add(d);
            for p in 0..2 {
                for q in 0..2 {
                    reference.set(a * 2 + p, b * 2 + q, new.at(p, q));
                }
            }
        }
    }
    assert!(weight(&l).max_abs_diff(&reference) < 1e-6);
}

// Kaiming ("Random") init follows PyTorch's bound 1/√fan_in and changes the output.
#[test]
fn random_init_bounds_follow_pytorch() {
    // 1,024 inputs give LoRA's A 4 × 1,024 = 4,096 draws, so the sample std of
    // N(0, 1/16) has a standard error of 0.25 / √(2 · 4,096) ≈ 0.0028 and the
    // 0.02 tolerance below is seven standard errors: the draw is unseeded (Burn's
    // global RNG, shared by parallel tests), so the test must hold for any draw.
    let mut l = layer(&Mat::zeros(64, 1024));
    l.add_adapter("k", &AdapterSpec::bone(8).with_init(AdapterInit::Random))
        .unwrap();
    let block = to_mat(
        l.adapter("k").unwrap().peft_tensors()[0]
            .1
            .clone()
            .squeeze_dim(0),
    );
    let bound = 1.0 / 64f64.sqrt();
    assert!(block.max_abs() <= bound && block.max_abs() > 0.5 * bound);
    l.add_adapter(
        "g",
        &AdapterSpec::lora(4, 4.0).with_init(AdapterInit::Gaussian),
    )
    .unwrap();
    let a = to_mat(
        l.adapter("g").unwrap().peft_tensors()[0]
            .1
            .clone()
            .squeeze_dim(0),
    );
    let std = (a.v.iter().map(|v| v * v).sum::<f64>() / a.v.len() as f64).sqrt();
    assert!((std - 0.25).abs() < 0.02, "A ~ N(0, 1/r²): std {std}");
    assert_eq!(l.num_params(), 64 * 1024 + 8 * 64 + 4 * 1024 + 64 * 4);
}
