"""Request codes, header flags, feature bits and limits of the vhost-user protocol.

Numbers come from QEMU ``docs/interop/vhost-user.rst`` ("Front-end message types",
"Protocol features") and the virtio 1.2 specification. The limits are ours; each says
why it is what it is.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD_SIZE",
    "MAX_QUEUES",
    "MAX_QUEUE_SIZE",
    "MAX_REGIONS",
    "VERSION",
    "BackendRequest",
    "HeaderFlag",
    "ProtocolFeature",
    "Request",
    "VirtioFeature",
]

#: Bytes in a message header: request u32, flags u32, size u32 (vhost-user.rst "Header").
HEADER_SIZE = 12
#: The only protocol version there is (vhost-user.rst "Header", flags bits 0-1).
VERSION = 1
#: Largest payload we accept. The largest legitimate one is SET_MEM_TABLE with
#: MAX_REGIONS regions (8 + 8 * 32 = 264 bytes) or a config access (12 + 256); anything
#: bigger is a broken or hostile frontend, and we refuse to buffer it.
MAX_PAYLOAD_SIZE = 4096
#: Regions in one SET_MEM_TABLE: VHOST_MEMORY_BASELINE_NREGIONS in vhost-user.rst.
MAX_REGIONS = 8
#: File descriptors one message may carry: one per region at most.
MAX_FDS = MAX_REGIONS
#: Virtio config space we serve per access (VHOST_USER_MAX_CONFIG_SIZE in QEMU).
MAX_CONFIG_SIZE = 256
#: Queue indexes we accept. The balloon uses at most 5, but QEMU sends CALL/ERR/ENABLE
#: for every queue its ``num_vqs`` names, and a generous num_vqs must not break attach.
MAX_QUEUES = 16
#: Largest split-ring size the virtio spec allows (2.7 "Split Virtqueues": 32768).
MAX_QUEUE_SIZE = 32768


class Request(IntEnum):
    """Front-end message types (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1  #: vhost-user.rst VHOST_USER_GET_FEATURES
    SET_FEATURES = 2  #: vhost-user.rst VHOST_USER_SET_FEATURES
    SET_OWNER = 3  #: vhost-user.rst VHOST_USER_SET_OWNER
    RESET_OWNER = 4  #: vhost-user.rst VHOST_USER_RESET_OWNER (deprecated)
    SET_MEM_TABLE = 5  #: vhost-user.rst VHOST_USER_SET_MEM_TABLE
    SET_LOG_BASE = 6  #: vhost-user.rst VHOST_USER_SET_LOG_BASE
    SET_LOG_FD = 7  #: vhost-user.rst VHOST_USER_SET_LOG_FD
    SET_VRING_NUM = 8  #: vhost-user.rst VHOST_USER_SET_VRING_NUM
    SET_VRING_ADDR = 9  #: vhost-user.rst VHOST_USER_SET_VRING_ADDR
    SET_VRING_BASE = 10  #: vhost-user.rst VHOST_USER_SET_VRING_BASE
    GET_VRING_BASE = 11  #: vhost-user.rst VHOST_USER_GET_VRING_BASE
    SET_VRING_KICK = 12  #: vhost-user.rst VHOST_USER_SET_VRING_KICK
    SET_VRING_CALL = 13  #: vhost-user.rst VHOST_USER_SET_VRING_CALL
    SET_VRING_ERR = 14  #: vhost-user.rst VHOST_USER_SET_VRING_ERR
    GET_PROTOCOL_FEATURES = 15  #: vhost-user.rst VHOST_USER_GET_PROTOCOL_FEATURES
    SET_PROTOCOL_FEATURES = 16  #: vhost-user.rst VHOST_USER_SET_PROTOCOL_FEATURES
    GET_QUEUE_NUM = 17  #: vhost-user.rst VHOST_USER_GET_QUEUE_NUM
    SET_VRING_ENABLE = 18  #: vhost-user.rst VHOST_USER_SET_VRING_ENABLE
    SEND_RARP = 19  #: vhost-user.rst VHOST_USER_SEND_RARP
    NET_SET_MTU = 20  #: vhost-user.rst VHOST_USER_NET_SET_MTU
    SET_BACKEND_REQ_FD = 21  #: vhost-user.rst VHOST_USER_SET_BACKEND_REQ_FD
    IOTLB_MSG = 22  #: vhost-user.rst VHOST_USER_IOTLB_MSG
    SET_VRING_ENDIAN = 23  #: vhost-user.rst VHOST_USER_SET_VRING_ENDIAN
    GET_CONFIG = 24  #: vhost-user.rst VHOST_USER_GET_CONFIG
    SET_CONFIG = 25  #: vhost-user.rst VHOST_USER_SET_CONFIG
    CREATE_CRYPTO_SESSION = 26  #: vhost-user.rst VHOST_USER_CREATE_CRYPTO_SESSION
    CLOSE_CRYPTO_SESSION = 27  #: vhost-user.rst VHOST_USER_CLOSE_CRYPTO_SESSION
    POSTCOPY_ADVISE = 28  #: vhost-user.rst VHOST_USER_POSTCOPY_ADVISE
    POSTCOPY_LISTEN = 29  #: vhost-user.rst VHOST_USER_POSTCOPY_LISTEN
    POSTCOPY_END = 30  #: vhost-user.rst VHOST_USER_POSTCOPY_END
    GET_INFLIGHT_FD = 31  #: vhost-user.rst VHOST_USER_GET_INFLIGHT_FD
    SET_INFLIGHT_FD = 32  #: vhost-user.rst VHOST_USER_SET_INFLIGHT_FD
    GPU_SET_SOCKET = 33  #: vhost-user.rst VHOST_USER_GPU_SET_SOCKET
    RESET_DEVICE = 34  #: vhost-user.rst VHOST_USER_RESET_DEVICE
    VRING_KICK = 35  #: vhost-user.rst VHOST_USER_VRING_KICK (in-band notifications)
    GET_MAX_MEM_SLOTS = 36  #: vhost-user.rst VHOST_USER_GET_MAX_MEM_SLOTS
    ADD_MEM_REG = 37  #: vhost-user.rst VHOST_USER_ADD_MEM_REG
    REM_MEM_REG = 38  #: vhost-user.rst VHOST_USER_REM_MEM_REG
    SET_STATUS = 39  #: vhost-user.rst VHOST_USER_SET_STATUS
    GET_STATUS = 40  #: vhost-user.rst VHOST_USER_GET_STATUS
    GET_SHARED_OBJECT = 41  #: vhost-user.rst VHOST_USER_GET_SHARED_OBJECT
    SET_DEVICE_STATE_FD = 42  #: vhost-user.rst VHOST_USER_SET_DEVICE_STATE_FD
    CHECK_DEVICE_STATE = 43  #: vhost-user.rst VHOST_USER_CHECK_DEVICE_STATE


class BackendRequest(IntEnum):
    """Back-end message types, sent on the SET_BACKEND_REQ_FD channel (vhost-user.rst
    "Back-end message types")."""

    IOTLB_MSG = 1  #: vhost-user.rst VHOST_USER_BACKEND_IOTLB_MSG
    CONFIG_CHANGE_MSG = 2  #: vhost-user.rst VHOST_USER_BACKEND_CONFIG_CHANGE_MSG
    VRING_HOST_NOTIFIER_MSG = 3  #: vhost-user.rst VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG
    VRING_CALL = 4  #: vhost-user.rst VHOST_USER_BACKEND_VRING_CALL
    VRING_ERR = 5  #: vhost-user.rst VHOST_USER_BACKEND_VRING_ERR


class HeaderFlag(IntFlag):
    """Bits of the header's flags word (vhost-user.rst "Header")."""

    VERSION_MASK = 0x3  #: bits 0-1: protocol version, always 1
    REPLY = 1 << 2  #: bit 2: this message is a reply (backend -> frontend only)
    NEED_REPLY = 1 << 3  #: bit 3: REPLY_ACK requested (vhost-user.rst "REPLY_ACK")


class ProtocolFeature(IntFlag):
    """Protocol feature bits (vhost-user.rst "Protocol features")."""

    MQ = 1 << 0  #: VHOST_USER_PROTOCOL_F_MQ
    LOG_SHMFD = 1 << 1  #: VHOST_USER_PROTOCOL_F_LOG_SHMFD
    RARP = 1 << 2  #: VHOST_USER_PROTOCOL_F_RARP
    REPLY_ACK = 1 << 3  #: VHOST_USER_PROTOCOL_F_REPLY_ACK
    NET_MTU = 1 << 4  #: VHOST_USER_PROTOCOL_F_NET_MTU
    BACKEND_REQ = 1 << 5  #: VHOST_USER_PROTOCOL_F_BACKEND_REQ
    CROSS_ENDIAN = 1 << 6  #: VHOST_USER_PROTOCOL_F_CROSS_ENDIAN
    CRYPTO_SESSION = 1 << 7  #: VHOST_USER_PROTOCOL_F_CRYPTO_SESSION
    PAGEFAULT = 1 << 8  #: VHOST_USER_PROTOCOL_F_PAGEFAULT
    CONFIG = 1 << 9  #: VHOST_USER_PROTOCOL_F_CONFIG
    BACKEND_SEND_FD = 1 << 10  #: VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD
    HOST_NOTIFIER = 1 << 11  #: VHOST_USER_PROTOCOL_F_HOST_NOTIFIER
    INFLIGHT_SHMFD = 1 << 12  #: VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD
    RESET_DEVICE = 1 << 13  #: VHOST_USER_PROTOCOL_F_RESET_DEVICE
    INBAND_NOTIFICATIONS = 1 << 14  #: VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS
    CONFIGURE_MEM_SLOTS = 1 << 15  #: VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS
    STATUS = 1 << 16  #: VHOST_USER_PROTOCOL_F_STATUS
    XEN_MMAP = 1 << 17  #: VHOST_USER_PROTOCOL_F_XEN_MMAP
    SHARED_OBJECT = 1 << 18  #: VHOST_USER_PROTOCOL_F_SHARED_OBJECT
    DEVICE_STATE = 1 << 19  #: VHOST_USER_PROTOCOL_F_DEVICE_STATE


class VirtioFeature(IntFlag):
    """Device-independent virtio feature bits (virtio 1.2 section 6) and vhost-user's bit 30."""

    RING_INDIRECT_DESC = 1 << 28  #: virtio 1.2 6: VIRTIO_F_INDIRECT_DESC
    RING_EVENT_IDX = 1 << 29  #: virtio 1.2 6: VIRTIO_F_EVENT_IDX
    PROTOCOL_FEATURES = 1 << 30  #: vhost-user.rst VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32  #: virtio 1.2 6: VIRTIO_F_VERSION_1
    ACCESS_PLATFORM = 1 << 33  #: virtio 1.2 6: VIRTIO_F_ACCESS_PLATFORM
