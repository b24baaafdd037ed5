//! Raw FFI bindings over ggml: `ggml.h`, `ggml-alloc.h`, `ggml-backend.h`, `ggml-cpu.h`
//! and `gguf.h`. Backends other than the CPU (CUDA) are modules loaded at run time through
//! the generic `ggml_backend_load` / `ggml_backend_reg_*` / `ggml_backend_dev_*` API.
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
