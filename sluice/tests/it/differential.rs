//! Differential test: random and mutated frames under random policies through
//! both the XDP program (BPF_PROG_TEST_RUN) and the reference model. Every
//! verdict must agree, and so must every counter the frames moved.
//! Reproduce a failure with `SLUICE_SEED=<seed>`. Needs root.

use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};

use crate::support::{
    frames::{mutate, random_frame, random_policy},
    kernel::{self, Expected},
    model,
};

const POLICIES: usize = 40;
const FRAMES_PER_POLICY: usize = 2_600;
/// BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header.
const MIN_TEST_RUN_LEN: usize = 14;

#[test]
fn kernel_agrees_with_model_on_random_and_mutated_frames() {
    let seed: u64 = std::env::var("SLUICE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    let mut rng = SmallRng::seed_from_u64(seed);
    let sandbox = kernel::new_sandbox();
    let mut maps = sandbox.policy().expect("policy maps");
    let mut compared = 0usize;
    let mut disagreements = Vec::new();

    for round in 0..POLICIES {
        let mut policy = random_policy(&mut rng);
        policy.rules.retain(kernel::storable);
        kernel::set_policy(&mut maps, &policy);
        let before = kernel::snapshot(&maps);
        let mut expected = Expected::default();
        for _ in 0..FRAMES_PER_POLICY {
            let mut frame = random_frame(&mut rng);
            if rng.gen_bool(0.5) {
                mutate(&mut rng, &mut frame);
            }
            if frame.len() < MIN_TEST_RUN_LEN {
                continue;
            }
            let want = model::judge(&policy, &frame);
            let got = sandbox.run(&frame).expect("test_run");
            compared += 1;
            if got.action != kernel::xdp_action(want.verdict) {
                disagreements.push(format!(
                    "round {round}: model {want:?}, kernel XDP action {}\npolicy: {policy:?}\nframe ({} bytes):\n{}",
                    got.action,
                    frame.len(),
                    kernel::hex(&frame)
                ));
                if disagreements.len() >= 5 {
                    break;
                }
            }
            expected.add(&want, frame.len());
        }
        let after = kernel::snapshot(&maps);
        if disagreements.is_empty()
            && let Err(e) = expected.check(&before, &after)
        {
            disagreements.push(format!(
                "round {round}: counters disagree with the model:\n{e}\npolicy: {policy:?}"
            ));
        }
        assert!(
            disagreements.is_empty(),
            "seed {seed} (rerun with SLUICE_SEED={seed}): {} disagreement(s) after {compared} frames:\n\n{}",
            disagreements.len(),
            disagreements.join("\n\n")
        );
    }
    assert!(
        compared >= 100_000,
        "only {compared} frames compared (seed {seed})"
    );
    eprintln!("seed {seed}: {compared} frames, zero disagreements");
}
