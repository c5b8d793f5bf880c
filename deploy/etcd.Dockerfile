# etcd for the compose cluster and its test: Debian's own etcd binary with the shared libraries
# it links, placed in a scratch image (no registry can be reached for an etcd image).
# `deploy/build-image` stages rootfs/ from the host's etcd-server package.
FROM scratch
COPY rootfs/ /
ENTRYPOINT ["/usr/bin/etcd"]
