//! flannel's `subnet.env`: how CNI plugins learn the node's subnet and MTU.

use std::path::Path;

use ipnet::Ipv4Net;

use crate::subnet::first_host;

/// The contents of a subnet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_NETWORK: the cluster network.
    pub network: Ipv4Net,
    /// The node's subnet (written as its first host address with the subnet's length).
    pub subnet: Ipv4Net,
    /// FLANNEL_MTU.
    pub mtu: u32,
    /// FLANNEL_IPMASQ.
    pub ip_masq: bool,
}

impl SubnetEnv {
    /// The file text, in flannel's format.
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            first_host(&self.subnet),
            self.subnet.prefix_len(),
            self.mtu,
            self.ip_masq
        )
    }

    /// Parses a subnet file; `None` unless every field is present and valid.
    pub fn parse(text: &str) -> Option<SubnetEnv> {
        let mut network = None;
        let mut subnet = None;
        let mut mtu = None;
        let mut ip_masq = None;
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            let v = v.trim();
            match k.trim() {
                "FLANNEL_NETWORK" => network = v.parse::<Ipv4Net>().ok(),
                "FLANNEL_SUBNET" => subnet = v.parse::<Ipv4Net>().ok().map(|n| n.trunc()),
                "FLANNEL_MTU" => mtu = v.parse().ok(),
                "FLANNEL_IPMASQ" => ip_masq = v.parse().ok(),
                _ => {}
            }
        }
        Some(SubnetEnv {
            network: network?,
            subnet: subnet?,
            mtu: mtu?,
            ip_masq: ip_masq?,
        })
    }

    /// Reads a subnet file; `None` if it is missing or unreadable (a first start).
    pub fn read(path: &Path) -> Option<SubnetEnv> {
        std::fs::read_to_string(path).ok().and_then(|t| Self::parse(&t))
    }

    /// Writes the file atomically: readers see the old file or the new one, never a torn one.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::atomic::write(path, self.render().as_bytes(), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.7.0/24".parse().unwrap(),
            mtu: 1472,
            ip_masq: false,
        }
    }

    #[test]
    fn renders_flannel_format() {
        assert_eq!(
            env().render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run/flannel/subnet.env");
        env().write(&p).unwrap();
        assert_eq!(SubnetEnv::read(&p), Some(env()));
        assert_eq!(
            std::fs::read_dir(p.parent().unwrap()).unwrap().count(),
            1,
            "temp file left behind"
        );
    }

    #[test]
    fn incomplete_files_are_ignored() {
        assert_eq!(SubnetEnv::parse("FLANNEL_NETWORK=10.0.0.0/8\nFLANNEL_MTU=1450\n"), None);
        assert_eq!(SubnetEnv::read(Path::new("/nonexistent/subnet.env")), None);
    }
}
