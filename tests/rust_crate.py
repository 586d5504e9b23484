"""A small real Rust crate the sandbox tests mine, patch and build (test_eval.py, test_grpo.py)."""

from __future__ import annotations

from pathlib import Path

SUM_OF_SQUARES_LIB = """\
/// Sum of the squares of `xs`.
pub fn sum_of_squares(xs: &[i64]) -> i64 {
    let mut total = 0;
    for &x in xs {
        total += x * x;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_squares() {
        assert_eq!(sum_of_squares(&[1, 2, 3]), 14);
        assert_eq!(sum_of_squares(&[]), 0);
    }
}
"""


def manifest(name: str) -> str:
    return f'[package]\nname = "{name}"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\n'


def write_crate(directory: Path, name: str) -> Path:
    """`directory` as the crate `name`: Cargo.toml and src/lib.rs (SUM_OF_SQUARES_LIB)."""
    (directory / "src").mkdir(parents=True)
    (directory / "Cargo.toml").write_text(manifest(name))
    (directory / "src" / "lib.rs").write_text(SUM_OF_SQUARES_LIB)
    return directory
