//! The one bounds-checked pointer into an XDP frame: every header read and
//! write goes through it. Re-derive pointers after any helper that moves data.

use aya_ebpf::programs::XdpContext;

/// A pointer to a `T` at `offset` in the frame, or `None` when the frame
/// ends before the whole `T`.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}
