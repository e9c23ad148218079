//! Polynomials over the symbolic dims: buffer sizes, strides, offsets, uniform values and cost
//! estimates of a plan are products and sums of [`Dim`]s (`batch·seq·64`, `(past+seq)·64`),
//! kept in a normal form (monomial → coefficient) so that equal sizes compare equal and print
//! the same way, and evaluated once the runtime has bound the dims.

use std::collections::BTreeMap;
use std::fmt;

use transfuse_ir::{Bindings, Dim};

use crate::CodegenError;

/// `Σ coeff · Π symbols`, normal form: monomials as sorted symbol lists, no zero coefficients.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Poly {
    terms: BTreeMap<Vec<String>, i64>,
}

impl Poly {
    /// 0.
    pub fn zero() -> Poly {
        Poly::default()
    }

    /// 1.
    pub fn one() -> Poly {
        Poly::konst(1)
    }

    /// A constant.
    pub fn konst(c: i64) -> Poly {
        let mut terms = BTreeMap::new();
        if c != 0 {
            terms.insert(vec![], c);
        }
        Poly { terms }
    }

    /// A symbol.
    pub fn sym(s: &str) -> Poly {
        Poly {
            terms: BTreeMap::from([(vec![s.to_string()], 1)]),
        }
    }

    /// A (linear) dim.
    pub fn dim(d: &Dim) -> Poly {
        let mut p = Poly::konst(d.constant());
        for (s, c) in d.terms() {
            p = p.add(&Poly::sym(s).scale(*c));
        }
        p
    }

    /// The product of dims (1 for none).
    pub fn product(dims: &[Dim]) -> Poly {
        dims.iter()
            .fold(Poly::one(), |acc, d| acc.mul(&Poly::dim(d)))
    }

    /// `self + o`.
    pub fn add(&self, o: &Poly) -> Poly {
        let mut terms = self.terms.clone();
        for (m, c) in &o.terms {
            *terms.entry(m.clone()).or_insert(0) += c;
        }
        terms.retain(|_, c| *c != 0);
        Poly { terms }
    }

    /// `self - o`.
    pub fn sub(&self, o: &Poly) -> Poly {
        self.add(&o.scale(-1))
    }

    /// `self · c`.
    pub fn scale(&self, c: i64) -> Poly {
        if c == 0 {
            return Poly::zero();
        }
        Poly {
            terms: self.terms.iter().map(|(m, k)| (m.clone(), k * c)).collect(),
        }
    }

    /// `self · o`.
    pub fn mul(&self, o: &Poly) -> Poly {
        let mut terms: BTreeMap<Vec<String>, i64> = BTreeMap::new();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &o.terms {
                let mut m = ma.clone();
                m.extend(mb.iter().cloned());
                m.sort();
                *terms.entry(m).or_insert(0) += ca * cb;
            }
        }
        terms.retain(|_, c| *c != 0);
        Poly { terms }
    }

    /// True for 0.
    pub fn is_zero(&self) -> bool {
        self.terms.is_empty()
    }

    /// The value if no symbol occurs.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    /// True if the polynomial is the constant `c`.
    pub fn is(&self, c: i64) -> bool {
        self.as_const() == Some(c)
    }

    /// The symbols mentioned.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms.keys().flat_map(|m| m.iter().map(String::as_str))
    }

    /// The value under `b`; errors name an unbound symbol.
    pub fn eval(&self, b: &Bindings) -> Result<i64, CodegenError> {
        let mut v: i64 = 0;
        for (m, c) in &self.terms {
            let mut t = *c;
            for s in m {
                let x = b.get(s).ok_or_else(|| {
                    CodegenError::Plan(format!("symbolic dim `{s}` is not bound"))
                })?;
                t = t.saturating_mul(*x as i64);
            }
            v = v.saturating_add(t);
        }
        Ok(v)
    }

    /// The value under `b` as a size (≥ 0).
    pub fn eval_usize(&self, b: &Bindings) -> Result<usize, CodegenError> {
        let v = self.eval(b)?;
        usize::try_from(v).map_err(|_| CodegenError::Plan(format!("{self} = {v} is negative")))
    }

    /// Exact division by a constant, if every coefficient is a multiple of `c`.
    pub fn div_exact(&self, c: i64) -> Option<Poly> {
        if c == 0 || self.terms.values().any(|k| k % c != 0) {
            return None;
        }
        Some(Poly {
            terms: self.terms.iter().map(|(m, k)| (m.clone(), k / c)).collect(),
        })
    }
}

impl fmt::Display for Poly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        // Highest degree first, the constant last: `64*batch*seq+64`.
        let mut terms: Vec<(&Vec<String>, &i64)> = self.terms.iter().collect();
        terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        for (i, (m, c)) in terms.into_iter().enumerate() {
            let (neg, a) = (*c < 0, c.unsigned_abs());
            if neg {
                f.write_str("-")?;
            } else if i > 0 {
                f.write_str("+")?;
            }
            if m.is_empty() {
                write!(f, "{a}")?;
            } else {
                if a != 1 {
                    write!(f, "{a}*")?;
                }
                f.write_str(&m.join("*"))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Poly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_of_dims_normalise_print_and_evaluate() {
        let ps = Dim::sym("past").plus(&Dim::sym("seq"));
        let p = Poly::product(&[Dim::sym("batch"), ps.clone(), Dim::known(64)]);
        assert_eq!(p.to_string(), "64*batch*past+64*batch*seq");
        let q = Poly::dim(&Dim::sym("batch")).mul(&Poly::dim(&ps)).scale(64);
        assert_eq!(p, q);
        let b: Bindings = [("batch", 2), ("past", 3), ("seq", 4)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(p.eval(&b).unwrap(), 2 * 7 * 64);
        assert_eq!(Poly::konst(5).sub(&Poly::sym("seq")).to_string(), "-seq+5");
        assert!(Poly::sym("x").eval(&b).is_err());
        assert_eq!(Poly::konst(12).as_const(), Some(12));
        assert_eq!(p.div_exact(64).unwrap().to_string(), "batch*past+batch*seq");
    }
}
