#!/bin/busybox sh
# /init of the test and demo guest: load the balloon driver, run a memory workload,
# print markers and /proc/meminfo to the serial console, power off.
#
# Kernel command line knobs (all optional):
#   vub.order=N     write N to page_reporting_order (report smaller blocks)
#   vub.mib=N       MiB to allocate and free per round (default 1024)
#   vub.rounds=N    rounds of allocate/free (default 1)
#   vub.settle=S    seconds to wait after each free for reports (default 40)
#   vub.hold=S      seconds to hold the allocation (default 2)
#   vub.idle=S      seconds to idle after boot before the first round (default 3)
#   vub.watch=S     before the rounds, print meminfo every second for S seconds
#                   (default 0), e.g. while the host resizes the balloon
#   vub.cache=N     after boot, read N MiB of the first virtio disk (/dev/vda) and
#                   keep it open, so that it stays in the page cache (default 0)
#   vub.plugged=N   before the rounds, wait (up to 60 s) until MemTotal reaches N MiB:
#                   memory plugged at boot (virtio-mem) is online and in the tmpfs size
#   vub.mixed=S     before the rounds, for S seconds: rewrite 64 tmpfs files with sizes
#                   of 64 KiB to 4 MiB (mostly not 2 MiB multiples), and, where there
#                   is a disk, read 32 MiB of it every 50 files and drop the page cache;
#                   then idle vub.settle seconds (default 0)
# Markers start with "VUB:" so the runner can follow along.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

order= mib=1024 rounds=1 settle=40 hold=2 idle=3 watch=0 cache=0 plugged=0 mixed=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vub.order=*) order=${arg#vub.order=} ;;
        vub.mib=*) mib=${arg#vub.mib=} ;;
        vub.rounds=*) rounds=${arg#vub.rounds=} ;;
        vub.settle=*) settle=${arg#vub.settle=} ;;
        vub.hold=*) hold=${arg#vub.hold=} ;;
        vub.idle=*) idle=${arg#vub.idle=} ;;
        vub.watch=*) watch=${arg#vub.watch=} ;;
        vub.cache=*) cache=${arg#vub.cache=} ;;
        vub.plugged=*) plugged=${arg#vub.plugged=} ;;
        vub.mixed=*) mixed=${arg#vub.mixed=} ;;
    esac
done

meminfo() {
    echo "VUB: meminfo $1 $(awk '/^(MemTotal|MemFree|MemAvailable):/ {printf "%s%s ", $1, $2}' /proc/meminfo)"
}

for m in $(cat /modules.list); do
    insmod "/modules/$m.ko" || echo "VUB: insmod $m failed"
done
echo "VUB: booted kernel=$(uname -r)"
features=$(cat /sys/bus/virtio/drivers/virtio_balloon/virtio*/features 2>/dev/null)
echo "VUB: balloon features=${features:-none}"
reporting_order=/sys/module/page_reporting/parameters/page_reporting_order
if [ -n "$order" ]; then
    echo "$order" >"$reporting_order" || echo "VUB: page_reporting_order $order refused"
fi
[ -r "$reporting_order" ] && echo "VUB: page_reporting_order=$(cat "$reporting_order")"
meminfo boot
if [ "$cache" -gt 0 ]; then
    # the last close of a block device drops its cache: hold it open
    exec 3</dev/vda
    dd if=/dev/vda of=/dev/null bs=1M count="$cache" 2>/dev/null
    meminfo cached
    echo "VUB: cached mib=$cache"
fi
if [ "$plugged" -gt 0 ]; then
    j=0
    while [ "$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)" -lt "$plugged" ] \
            && [ "$j" -lt 120 ]; do
        sleep 0.5
        j=$((j + 1))
    done
    meminfo plugged
    echo "VUB: plugged"
fi
mkdir -p /work
mount -t tmpfs -o size=95% tmpfs /work
sleep "$idle"
meminfo idle
if [ "$watch" -gt 0 ]; then
    echo "VUB: watching"
    j=0
    while [ "$j" -lt "$watch" ]; do
        meminfo watch
        sleep 1
        j=$((j + 1))
    done
fi
if [ "$mixed" -gt 0 ]; then
    echo "VUB: mixed start"
    end=$(($(cut -d. -f1 /proc/uptime) + mixed))
    n=0 reads=0
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        dd if=/dev/zero of=/work/m$((n % 64)) bs=64k count=$((RANDOM % 64 + 1)) 2>/dev/null
        n=$((n + 1))
        if [ $((n % 50)) -eq 0 ] && [ -b /dev/vda ]; then
            dd if=/dev/vda of=/dev/null bs=1M count=32 skip=$((RANDOM % 32 * 32)) 2>/dev/null
            echo 1 >/proc/sys/vm/drop_caches
            reads=$((reads + 1))
        fi
    done
    rm -f /work/m*
    meminfo mixed
    echo "VUB: mixed done"
    echo "VUB: mixed files=$n disk_reads=$reads"
    sleep "$settle"
    echo "VUB: mixed settled"
fi
echo "VUB: ready"
i=1
while [ "$i" -le "$rounds" ]; do
    echo "VUB: alloc round=$i mib=$mib"
    dd if=/dev/zero of=/work/fill bs=1M count="$mib" 2>/dev/null
    meminfo allocated
    echo "VUB: allocated round=$i"
    sleep "$hold"
    rm -f /work/fill
    echo "VUB: freed round=$i"
    sleep "$settle"
    meminfo settled
    echo "VUB: settled round=$i"
    i=$((i + 1))
done
echo "VUB: done"
sync
poweroff -f
