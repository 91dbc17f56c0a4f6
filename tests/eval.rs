//! Integration tests of the evaluation parts that need real files: the MMLU data in
//! `../shared/data/mmlu`, the training-curve PNG (decoded and inspected) and `ropo plot`.

mod common;

use std::path::Path;
use std::process::Command;

use ropo::eval::mmlu::{self, Split};

fn mmlu_root() -> std::path::PathBuf {
    mmlu::data_root(&common::shared("data/mmlu")).expect("../shared/data/mmlu holds data/test")
}

#[test]
fn mmlu_parses_every_shared_file() {
    // Row counts from ../shared/data/README.md (hendrycks/test at 785eba57):
    // dev 285, val 1,542, test 14,079 over 57 subjects.
    let root = mmlu_root();
    for (split, rows) in [(Split::Dev, 285), (Split::Val, 1542), (Split::Test, 14079)] {
        let subjects = mmlu::subjects(&root, split).unwrap();
        assert_eq!(subjects.len(), 57, "{split:?}");
        let total: usize = subjects
            .iter()
            .map(|s| mmlu::load_csv(&root.join(split.name()).join(format!("{s}_{}.csv", split.name()))).unwrap().len())
            .sum();
        assert_eq!(total, rows, "{split:?}");
    }
}

#[test]
fn mmlu_subject_and_prompt_from_real_files() {
    let root = mmlu_root();
    let sd = mmlu::load_subject(&root, "abstract_algebra", Split::Test, Some(10)).unwrap();
    assert_eq!(sd.dev.len(), 5);
    assert_eq!(sd.questions.len(), 10);
    // dev row 2 of abstract_algebra_dev.csv is quoted and holds commas in its choices
    assert_eq!(sd.dev[1].choices[0], "True, True");
    assert_eq!(sd.dev[1].answer, 1);
    let p = mmlu::build_prompt(&sd.subject, &sd.dev, 5, &sd.questions[0]);
    assert!(p.starts_with(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n\
         Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    ));
    assert_eq!(p.matches("\nAnswer:").count(), 6);
    assert!(p.ends_with("\nAnswer:"));
}

#[test]
fn mmlu_unknown_subject_lists_close_matches() {
    let e = mmlu::load_subject(&mmlu_root(), "abstract_algebre", Split::Test, None).unwrap_err().to_string();
    assert!(e.contains("unknown MMLU subject \"abstract_algebre\"") && e.contains("did you mean: abstract_algebra"), "{e}");
    let e = mmlu::load_subject(&mmlu_root(), "highschool_physics", Split::Test, None).unwrap_err().to_string();
    assert!(e.contains("high_school_physics"), "{e}");
    let e = mmlu::data_root(Path::new("/nonexistent/mmlu")).unwrap_err().to_string();
    assert!(e.contains("not an MMLU data folder"), "{e}");
}

#[test]
fn mmlu_malformed_row_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("test")).unwrap();
    std::fs::create_dir_all(dir.path().join("dev")).unwrap();
    std::fs::write(dir.path().join("dev/toy_dev.csv"), "q,a,b,c,d,A\n").unwrap();
    std::fs::write(dir.path().join("test/toy_test.csv"), "q,a,b,c,d,A\n\"multi\nline\",a,b,c,d,B\nq,a,b,c,d\n").unwrap();
    let e = mmlu::load_subject(dir.path(), "toy", Split::Test, None).unwrap_err().to_string();
    assert!(e.ends_with("test/toy_test.csv:4: expected 6 fields (question,A,B,C,D,answer), got 5"), "{e}");
}

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics.jsonl");

/// Pixels of exactly this colour.
fn count_rgb(img: &image::RgbImage, rgb: [u8; 3]) -> usize {
    img.pixels().filter(|p| p.0 == rgb).count()
}

#[test]
fn plot_writes_a_png_with_curves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("curves.png");
    let curves = ropo::plot::plot_metrics_file(Path::new(FIXTURE), &out).unwrap();
    // fixture: 60 train steps, eval every 10 steps, one summary record without a step
    for s in &curves.series {
        assert_eq!((s.train.len(), s.eval.len()), (60, 6));
    }
    assert_eq!(curves.skipped, 1);
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (ropo::plot::WIDTH, ropo::plot::HEIGHT));
    // the train (blue) and eval (red) curves are drawn in every panel: count their pixels in
    // each third of the image (a 2-px line over a panel is well over 300 pixels)
    let third = ropo::plot::WIDTH / 3;
    for p in 0..3 {
        let panel = image::imageops::crop_imm(&img, p * third, 0, third, ropo::plot::HEIGHT).to_image();
        let blue = count_rgb(&panel, [31, 119, 180]);
        let red = count_rgb(&panel, [214, 39, 40]);
        assert!(blue > 300 && red > 300, "panel {p}: blue {blue} red {red}");
    }
    // text was rendered (dark anti-aliased glyph pixels in the caption band at the top)
    let caption = image::imageops::crop_imm(&img, 0, 0, ropo::plot::WIDTH, 40).to_image();
    assert!(caption.pixels().filter(|p| p.0.iter().all(|&c| c < 100)).count() > 100);
    // nothing else left in the folder (the temporary file was renamed)
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn plot_cli_default_output_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::copy(FIXTURE, &metrics).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ropo")).arg("plot").arg(&metrics).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(dir.path().join("curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // a bad line: exit 2, file:line in the message, no PNG written
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"step\":1,\"loss\":0.7}\nnot json\n").unwrap();
    let target = dir.path().join("bad.png");
    let out = Command::new(env!("CARGO_BIN_EXE_ropo")).arg("plot").arg(&bad).arg("--out").arg(&target).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2: invalid JSON"), "{err}");
    assert!(!target.exists());

    // a missing file
    let out = Command::new(env!("CARGO_BIN_EXE_ropo")).arg("plot").arg(dir.path().join("none.jsonl")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none.jsonl: cannot open"));
}
