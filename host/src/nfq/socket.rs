//! A netfilter netlink socket (`NETLINK_NETFILTER`): what the queue's verdict loops and the
//! kernel's map of known services talk to the kernel through. Bytes in, bytes out; the
//! messages are [`super::msg`]'s and [`super::nft`]'s.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::msg::NETLINK_NETFILTER;

/// Most messages one [`Socket::recv_many`] takes.
pub const MAX_READS: usize = 32;

/// An open, bound netfilter netlink socket.
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// Opens one with a receive buffer of `rcvbuf` bytes (forced past the system's limit: a
    /// burst from the kernel must not be lost) on which the kernel's ENOBUFS is off.
    pub fn open(rcvbuf: i32) -> std::io::Result<Socket> {
        // SAFETY: plain socket calls on a descriptor this function owns from here on.
        let fd = unsafe {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        // SAFETY: an all-zero sockaddr_nl is a valid value of the type.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `addr` is a valid sockaddr_nl of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        // SAFETY: option values are c_ints that outlive the calls.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_NO_ENOBUFS,
                (&one as *const libc::c_int).cast(),
                4,
            );
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&rcvbuf as *const libc::c_int).cast(),
                4,
            );
        }
        Ok(Socket { fd })
    }

    /// Sends `m` (one message or a batch) to the kernel.
    pub fn send(&self, m: &[u8]) -> std::io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl (pid 0: the kernel) is a valid value of the type.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `m` and `addr` are valid for the call.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one read; without waiting when `nowait` (then `WouldBlock` if nothing came).
    pub fn recv(&self, buf: &mut [u8], nowait: bool) -> std::io::Result<usize> {
        let flags = if nowait { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: `buf` is valid for writes of its length.
        let r = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Receives up to `lens.len()` messages (at most [`MAX_READS`]) with one `recvmmsg`,
    /// without waiting: the k-th into `buf`'s k-th `slot` bytes, its length in `lens[k]`, or
    /// `None` when it did not fit. How many; `WouldBlock` when none waits.
    pub fn recv_many(&self, buf: &mut [u8], slot: usize, lens: &mut [Option<usize>]) -> std::io::Result<usize> {
        let count = lens.len().min(MAX_READS).min(buf.len() / slot.max(1));
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_READS];
        // SAFETY: a plain C struct for which all-zero is valid (null pointers, zero lengths).
        let mut hdrs: [libc::mmsghdr; MAX_READS] = unsafe { std::mem::zeroed() };
        for (k, chunk) in buf.chunks_exact_mut(slot.max(1)).take(count).enumerate() {
            iovs[k] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            };
            hdrs[k].msg_hdr.msg_iov = &mut iovs[k];
            hdrs[k].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `count` headers each point at one iovec over a distinct, writable
        // slot of `buf`; all of them outlive the call, which writes only inside them.
        let n = unsafe { crate::tunnel::sock::recv_messages(self.fd.as_raw_fd(), &mut hdrs[..count]) }?;
        for (len, h) in lens.iter_mut().zip(&hdrs).take(n) {
            let whole = h.msg_hdr.msg_flags & libc::MSG_TRUNC == 0;
            *len = whole.then_some(h.msg_len as usize);
        }
        Ok(n)
    }

    /// Waits until a read would return something.
    pub fn wait(&self) {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, -1) };
    }
}
