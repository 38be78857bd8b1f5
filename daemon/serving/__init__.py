"""Serving one VM's connection: messages on the socket (``framing``), the session's
effects carried out (``connection``), one task per queue (``queues``), guest RAM as
this process maps it (``guestram``), what may be given back and the giving
(``discard``), and whether QEMU pins guest RAM for a device (``passthrough``). Imports
the protocol package, ``linux``, ``observing`` and ``handover``; never the settings
(``config``): it is handed plain values.
"""
