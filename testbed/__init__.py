"""The real-guest test bed: QEMU 11 and Debian guest kernels, provisioned
(``provision``), a guest that allocates and frees memory (``guest-init.sh``, its
``/init``), the runner that boots it beside the daemon and measures host memory
(``guestrun``), QEMU's own balloon as the reference (``builtin-balloon.args``), and the
demo (``python -m testbed.demo``). Used by tests/e2e, the benchmarks and scripts/demo;
nothing here is installed with the package.
"""
