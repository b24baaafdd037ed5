//! ggml's log goes to `tracing`; errors ggml prints while a caller runs inside
//! [`capture_errors`] are also collected, so that e.g. GGUF parse failures reach the user as
//! an error value that names the problem rather than as stray log lines.
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Once;

use ggml_sys as sys;

thread_local! {
    static CAPTURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

static INSTALL: Once = Once::new();

unsafe extern "C" fn on_log(level: sys::ggml_log_level::Type, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated message that lives for the duration of the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let captured = CAPTURE.with(|c| {
        if let Some(buf) = c.borrow_mut().as_mut() {
            if level == sys::ggml_log_level::GGML_LOG_LEVEL_ERROR
                || level == sys::ggml_log_level::GGML_LOG_LEVEL_WARN
                || level == sys::ggml_log_level::GGML_LOG_LEVEL_CONT
            {
                buf.push_str(&msg);
            }
            true
        } else {
            false
        }
    });
    if captured {
        return;
    }
    let msg = msg.trim_end();
    if msg.is_empty() {
        return;
    }
    match level {
        sys::ggml_log_level::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "ggml", "{msg}"),
        sys::ggml_log_level::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "ggml", "{msg}"),
        sys::ggml_log_level::GGML_LOG_LEVEL_INFO => tracing::debug!(target: "ggml", "{msg}"),
        _ => tracing::trace!(target: "ggml", "{msg}"),
    }
}

/// Route ggml's log through `tracing` (idempotent).
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: the callback is a plain function valid for the life of the program.
        unsafe { sys::ggml_log_set(Some(on_log), std::ptr::null_mut()) };
    });
}

/// Run `f`, collecting the errors and warnings ggml logs on this thread meanwhile.
pub fn capture_errors<T>(f: impl FnOnce() -> T) -> (T, String) {
    install();
    let previous = CAPTURE.with(|c| c.borrow_mut().replace(String::new()));
    let out = f();
    let text = CAPTURE.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous)).unwrap_or_default();
    (out, text.trim().replace('\n', "; "))
}
