//! Dimensions that may be symbolic (`batch`, `seq`, `past+seq`) and their binding at run time.
//!
//! A [`Dim`] is a linear expression: a constant plus symbols with integer coefficients. That is
//! enough for everything a Transformer graph does with lengths (a KV cache concatenates `past`
//! and `seq` into `past+seq`) while keeping equality decidable: two dims are equal when their
//! normal forms are equal. Products of symbols are not representable; reshapes must keep
//! symbolic dims in place and only split or merge constant ones.

use std::collections::BTreeMap;
use std::fmt;

use crate::IrError;

/// A dimension: `konst + Σ coeff·symbol`, kept in normal form (sorted, no zero coefficients).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dim {
    konst: i64,
    terms: Vec<(String, i64)>,
}

/// Values for the symbols of a graph, bound from its inputs at run time.
pub type Bindings = BTreeMap<String, usize>;

impl Dim {
    /// A known size.
    pub fn known(n: usize) -> Dim {
        Dim {
            konst: n as i64,
            terms: Vec::new(),
        }
    }

    /// A symbol, such as `batch` or `seq`.
    pub fn sym(name: &str) -> Dim {
        Dim {
            konst: 0,
            terms: vec![(name.to_string(), 1)],
        }
    }

    /// The size, if the dim holds no symbol.
    pub fn as_known(&self) -> Option<usize> {
        if self.terms.is_empty() && self.konst >= 0 {
            Some(self.konst as usize)
        } else {
            None
        }
    }

    /// The symbol's name if the dim is exactly one symbol (`seq`, not `seq+1`).
    pub fn as_sym(&self) -> Option<&str> {
        match self.terms.as_slice() {
            [(name, 1)] if self.konst == 0 => Some(name),
            _ => None,
        }
    }

    /// True if the dim is the constant `n`.
    pub fn is(&self, n: usize) -> bool {
        self.as_known() == Some(n)
    }

    /// The constant term (`-1` in `seq-1`).
    pub fn constant(&self) -> i64 {
        self.konst
    }

    /// The symbolic terms `(symbol, coefficient)`, sorted by symbol, no zero coefficients.
    pub fn terms(&self) -> &[(String, i64)] {
        &self.terms
    }

    /// The symbols this dim mentions.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|(s, _)| s.as_str())
    }

    fn normalize(konst: i64, mut terms: BTreeMap<String, i64>) -> Dim {
        terms.retain(|_, c| *c != 0);
        Dim {
            konst,
            terms: terms.into_iter().collect(),
        }
    }

    fn combine(&self, other: &Dim, sign: i64) -> Dim {
        let mut terms: BTreeMap<String, i64> = self.terms.iter().cloned().collect();
        for (s, c) in &other.terms {
            *terms.entry(s.clone()).or_insert(0) += sign * c;
        }
        Dim::normalize(self.konst + sign * other.konst, terms)
    }

    /// `self + other`.
    pub fn plus(&self, other: &Dim) -> Dim {
        self.combine(other, 1)
    }

    /// `self - other`.
    pub fn minus(&self, other: &Dim) -> Dim {
        self.combine(other, -1)
    }

    /// `k · self`.
    pub fn scale(&self, k: usize) -> Dim {
        let k = k as i64;
        Dim::normalize(
            self.konst * k,
            self.terms.iter().map(|(s, c)| (s.clone(), c * k)).collect(),
        )
    }

    /// `self / k` when the constant and every coefficient divide by `k` (`2·c` / 2 = `c`);
    /// `None` otherwise (`seq` / 2 is not a linear dim).
    pub fn div_exact(&self, k: usize) -> Option<Dim> {
        let k = i64::try_from(k).ok().filter(|k| *k > 0)?;
        if self.konst % k != 0 || self.terms.iter().any(|(_, c)| c % k != 0) {
            return None;
        }
        Some(Dim::normalize(
            self.konst / k,
            self.terms.iter().map(|(s, c)| (s.clone(), c / k)).collect(),
        ))
    }

    /// The dim's value under `bindings`; an error names an unbound symbol or a negative result.
    pub fn eval(&self, bindings: &Bindings) -> Result<usize, IrError> {
        let mut v = self.konst;
        for (s, c) in &self.terms {
            let b = bindings
                .get(s)
                .ok_or_else(|| IrError::UnboundSymbol(s.clone()))?;
            v += c * *b as i64;
        }
        usize::try_from(v).map_err(|_| IrError::NegativeDim(format!("{self} = {v}")))
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::known(n)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Dim {
        Dim::sym(s)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return write!(f, "{}", self.konst);
        }
        for (i, (s, c)) in self.terms.iter().enumerate() {
            match (*c, i) {
                (1, 0) => write!(f, "{s}")?,
                (1, _) => write!(f, "+{s}")?,
                (-1, _) => write!(f, "-{s}")?,
                (c, 0) => write!(f, "{c}*{s}")?,
                (c, _) if c > 0 => write!(f, "+{c}*{s}")?,
                (c, _) => write!(f, "{c}*{s}")?,
            }
        }
        match self.konst {
            0 => Ok(()),
            k if k > 0 => write!(f, "+{k}"),
            k => write!(f, "{k}"),
        }
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// A shape: one [`Dim`] per axis.
pub type Shape = Vec<Dim>;

/// Prints a shape as `[batch, seq, 64]`.
pub fn shape_string(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// Builds a shape from anything convertible to dims: `shape![Dim::sym("batch"), 64]` style.
pub fn shape<I, D>(dims: I) -> Shape
where
    I: IntoIterator<Item = D>,
    D: Into<Dim>,
{
    dims.into_iter().map(Into::into).collect()
}

/// Evaluates every dim of a shape.
pub fn eval_shape(shape: &[Dim], bindings: &Bindings) -> Result<Vec<usize>, IrError> {
    shape.iter().map(|d| d.eval(bindings)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a sequence split needs: `N·c` splits into `c` and gathers back; `seq` alone
    /// does not divide.
    #[test]
    fn scaling_and_exact_division() {
        let c = Dim::sym("c");
        let padded = c.scale(4);
        assert_eq!(padded.to_string(), "4*c");
        assert_eq!(padded.div_exact(4), Some(c.clone()));
        assert_eq!(padded.div_exact(2), Some(c.scale(2)));
        assert_eq!(padded.div_exact(3), None);
        assert_eq!(Dim::sym("seq").div_exact(2), None);
        assert_eq!(Dim::known(6).div_exact(3), Some(Dim::known(2)));
        assert_eq!(Dim::known(6).div_exact(0), None);
        let pad = padded.minus(&Dim::sym("seq"));
        let b: Bindings = [("c".to_string(), 2), ("seq".to_string(), 6)].into();
        assert_eq!(pad.eval(&b).unwrap(), 2);
    }

    #[test]
    fn linear_dims_normalise_and_print() {
        let d = Dim::sym("seq").plus(&Dim::sym("past"));
        assert_eq!(d.to_string(), "past+seq");
        assert_eq!(d.minus(&Dim::sym("past")), Dim::sym("seq"));
        assert_eq!(Dim::sym("seq").plus(&Dim::known(1)).to_string(), "seq+1");
        let b: Bindings = [("past".to_string(), 3), ("seq".to_string(), 4)].into();
        assert_eq!(d.eval(&b).unwrap(), 7);
        assert!(Dim::sym("x").eval(&b).is_err());
        assert!(Dim::known(0).minus(&Dim::sym("seq")).eval(&b).is_err());
    }
}
