//! What a module may cost before it is compiled. Compiling time grows with the number of
//! functions and with the locals and instructions in each (a 1 MiB module of 130,000 empty
//! functions with 50,000 locals each keeps Cranelift busy for minutes), so the module's shape
//! is read first, with the parser wasmtime itself uses, and held against limits; a module over
//! any of them is refused by that limit's name before the compiler sees it. Reading the shape
//! stops at the first limit crossed, so a bomb costs milliseconds.

use wasmparser::{Parser, Payload};

/// The most a module may hold of each thing that drives compile time or memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeLimits {
    /// Functions defined.
    pub functions: u64,
    /// Locals one function declares.
    pub locals_per_function: u64,
    /// Locals all functions declare together.
    pub locals: u64,
    /// Bytes of one function body.
    pub function_body_bytes: u64,
    /// Tables.
    pub tables: u64,
    /// Initial elements of one table.
    pub table_elements: u64,
    /// Memories.
    pub memories: u64,
    /// Globals.
    pub globals: u64,
    /// Data segments.
    pub data_segments: u64,
    /// Element segments.
    pub element_segments: u64,
    /// Function types.
    pub types: u64,
    /// Imports.
    pub imports: u64,
    /// Exports.
    pub exports: u64,
}

impl Default for ShapeLimits {
    /// Far above what a policy module compiled from Rust holds (the examples in `policies/` have
    /// a few hundred functions and at most a few dozen locals each), far below a bomb.
    fn default() -> Self {
        ShapeLimits {
            functions: 10_000,
            locals_per_function: 2_000,
            locals: 200_000,
            function_body_bytes: 256 << 10,
            tables: 4,
            table_elements: 100_000,
            memories: 1,
            globals: 1_000,
            data_segments: 1_000,
            element_segments: 1_000,
            types: 2_000,
            imports: 64,
            exports: 256,
        }
    }
}

/// Why a module's shape was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// One limit crossed.
    #[error("module over the limit on {limit}: {value} > {max}")]
    Over {
        /// The limit's name.
        limit: &'static str,
        /// What the module holds (at least).
        value: u64,
        /// The limit.
        max: u64,
    },
    /// The bytes are not a well-formed module.
    #[error("invalid module: {0}")]
    Invalid(String),
}

/// What the shape check counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    /// Functions defined.
    pub functions: u64,
    /// Most locals of one function.
    pub max_locals: u64,
    /// Locals of all functions.
    pub locals: u64,
    /// Largest function body, bytes.
    pub max_body_bytes: u64,
}

fn over(limit: &'static str, value: u64, max: u64) -> Result<(), ShapeError> {
    if value > max {
        return Err(ShapeError::Over { limit, value, max });
    }
    Ok(())
}

fn invalid(e: wasmparser::BinaryReaderError) -> ShapeError {
    ShapeError::Invalid(e.message().to_string())
}

/// Reads `wasm`'s shape against `l`; the first limit crossed is the error.
pub fn check(wasm: &[u8], l: &ShapeLimits) -> Result<Shape, ShapeError> {
    let mut s = Shape::default();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(invalid)? {
            Payload::TypeSection(r) => over("function types", u64::from(r.count()), l.types)?,
            Payload::ImportSection(r) => over("imports", u64::from(r.count()), l.imports)?,
            Payload::FunctionSection(r) => over("functions", u64::from(r.count()), l.functions)?,
            Payload::TableSection(r) => {
                over("tables", u64::from(r.count()), l.tables)?;
                for t in r {
                    let t = t.map_err(invalid)?;
                    over("initial table elements", t.ty.initial, l.table_elements)?;
                }
            }
            Payload::MemorySection(r) => over("memories", u64::from(r.count()), l.memories)?,
            Payload::GlobalSection(r) => over("globals", u64::from(r.count()), l.globals)?,
            Payload::ExportSection(r) => over("exports", u64::from(r.count()), l.exports)?,
            Payload::ElementSection(r) => over("element segments", u64::from(r.count()), l.element_segments)?,
            Payload::DataSection(r) => over("data segments", u64::from(r.count()), l.data_segments)?,
            Payload::CodeSectionStart { count, .. } => over("functions", u64::from(count), l.functions)?,
            Payload::CodeSectionEntry(body) => function(&body, &mut s, l)?,
            _ => {}
        }
    }
    Ok(s)
}

/// One function body: its size and its locals, summed as declared (one declaration can name
/// millions of locals in five bytes).
fn function(body: &wasmparser::FunctionBody<'_>, s: &mut Shape, l: &ShapeLimits) -> Result<(), ShapeError> {
    s.functions += 1;
    let size = body.range().len() as u64;
    over("function body bytes", size, l.function_body_bytes)?;
    s.max_body_bytes = s.max_body_bytes.max(size);
    let mut locals = 0u64;
    for decl in body.get_locals_reader().map_err(invalid)? {
        let (count, _) = decl.map_err(invalid)?;
        locals += u64::from(count);
        over("locals per function", locals, l.locals_per_function)?;
    }
    s.max_locals = s.max_locals.max(locals);
    s.locals += locals;
    over("locals", s.locals, l.locals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wat(s: &str) -> Vec<u8> {
        wat::parse_str(s).expect("test module parses")
    }

    #[test]
    fn an_ordinary_module_passes_and_is_counted() {
        let m = wat(r#"(module (memory 1) (global i32 (i32.const 0))
            (func (local i32 i64) (nop)) (func (param i32) (result i32) (local.get 0)))"#);
        let s = check(&m, &ShapeLimits::default()).expect("passes");
        assert_eq!((s.functions, s.max_locals, s.locals), (2, 2, 2));
    }

    /// The issue's bomb in miniature: many functions, each with a huge local declaration.
    #[test]
    fn bombs_are_refused_by_the_limit_they_cross() {
        let l = ShapeLimits::default();
        let many_locals = wat("(module (func (local i32 i32) (local i64 i64 i64)))");
        let tight = ShapeLimits {
            locals_per_function: 4,
            ..l
        };
        match check(&many_locals, &tight) {
            Err(ShapeError::Over { limit, value, max }) => {
                assert_eq!((limit, value, max), ("locals per function", 5, 4));
            }
            other => panic!("{other:?}"),
        }
        let funcs: String = (0..20).map(|_| "(func)").collect();
        let m = wat(&format!("(module {funcs})"));
        let few = ShapeLimits { functions: 10, ..l };
        assert!(matches!(
            check(&m, &few),
            Err(ShapeError::Over {
                limit: "functions",
                value: 20,
                max: 10
            })
        ));
        let two_mems = wat("(module (memory 1) (memory 1))");
        assert!(matches!(
            check(&two_mems, &l),
            Err(ShapeError::Over { limit: "memories", .. })
        ));
        let big_table = wat("(module (table 1000000 funcref))");
        assert!(matches!(
            check(&big_table, &l),
            Err(ShapeError::Over {
                limit: "initial table elements",
                ..
            })
        ));
    }

    /// 50,000 locals in one declaration of a few bytes: counted as 50,000, refused at once.
    #[test]
    fn one_declaration_of_fifty_thousand_locals_is_refused() {
        // func type () -> (), one function, a body with one locals entry (50,000 x i32).
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        m.extend_from_slice(&[1, 4, 1, 0x60, 0, 0]); // type section
        m.extend_from_slice(&[3, 2, 1, 0]); // function section
        let body = [1u8, 0xd0, 0x86, 0x03, 0x7f, 0x0b]; // 1 entry: 50000 (LEB128) x i32, end
        m.extend_from_slice(&[10, body.len() as u8 + 2, 1, body.len() as u8]);
        m.extend_from_slice(&body);
        let t = std::time::Instant::now();
        match check(&m, &ShapeLimits::default()) {
            Err(ShapeError::Over { limit, value, .. }) => assert_eq!((limit, value), ("locals per function", 50_000)),
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < std::time::Duration::from_millis(50));
    }

    #[test]
    fn garbage_is_invalid_not_a_panic() {
        for junk in [
            &b"\0asm"[..],
            b"\0asm\x01\0\0\0\x0a\xff\xff",
            b"\0asm\x01\0\0\0\x01\x05\x01\x60",
        ] {
            assert!(
                matches!(check(junk, &ShapeLimits::default()), Err(ShapeError::Invalid(_))),
                "{junk:?}"
            );
        }
    }
}
