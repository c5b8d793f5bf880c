//! A netfilter netlink socket (`NETLINK_NETFILTER`): what the queue's verdict loops and the
//! kernel's map of known services talk to the kernel through. Bytes in, bytes out; the
//! messages are [`super::msg`]'s and [`super::nft`]'s.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::msg::NETLINK_NETFILTER;

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
