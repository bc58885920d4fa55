/*
 * Interdomain event channels on real Xen, one /dev/xen/evtchn fd per channel
 * (so the fd is readable only for this channel's port): bind with
 * IOCTL_EVTCHN_BIND_INTERDOMAIN, notify with IOCTL_EVTCHN_NOTIFY; the kernel
 * masks a port when it fires, reading the fd yields the pending ports and
 * writing them back unmasks them; close unbinds.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "platform_int.h"
#include "real_uapi.h"

struct real_evtchn {
    struct xb_evtchn base; /* base.fd: this channel's own /dev/xen/evtchn */
};

static int real_ack(struct xb_evtchn *ch)
{
    uint32_t ports[16];
    ssize_t n = read(ch->fd, ports, sizeof ports);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    if (n % (ssize_t)sizeof ports[0])
        return -EIO;
    if (n > 0) {
        ssize_t w = write(ch->fd, ports, (size_t)n);
        if (w < 0)
            return -errno;
        if (w != n)
            return -EIO;
    }
    return (int)(n / (ssize_t)sizeof ports[0]);
}

static int real_notify(struct xb_evtchn *ch)
{
    struct ioctl_evtchn_notify nt = {.port = ch->local_port};
    return ioctl(ch->fd, IOCTL_EVTCHN_NOTIFY, &nt) == 0 ? 0 : -errno;
}

static void real_close(struct xb_evtchn *ch)
{
    struct ioctl_evtchn_unbind ub = {.port = ch->local_port};
    (void)ioctl(ch->fd, IOCTL_EVTCHN_UNBIND, &ub); /* closing the fd would unbind too; say it explicitly */
    close(ch->fd);
    free(ch);
}

static const struct xb_evtchn_ops real_evtchn_ops = {
    .ack = real_ack,
    .notify = real_notify,
    .close = real_close,
};

struct xb_evtchn *xb_evtchn_bind_real(struct xb_platform *p, uint16_t domid, uint32_t remote_port, char *err)
{
    if (p->is_sim) {
        xb_seterr(err, "event channel to domain %u: real binding on the sim platform", domid);
        return NULL;
    }
    int fd = open(XB_EVTCHN_PATH, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        xb_seterr(err, "cannot open %s: %s", XB_EVTCHN_PATH, strerror(e));
        return NULL;
    }
    struct ioctl_evtchn_bind_interdomain b = {.remote_domain = domid, .remote_port = remote_port};
    int port = ioctl(fd, IOCTL_EVTCHN_BIND_INTERDOMAIN, &b);
    if (port < 0) {
        int e = errno;
        close(fd);
        xb_seterr(err, "bind event channel to domain %u port %u: %s", domid, remote_port, strerror(e));
        return NULL;
    }
    struct real_evtchn *r = calloc(1, sizeof *r);
    if (!r) {
        struct ioctl_evtchn_unbind ub = {.port = (unsigned)port};
        (void)ioctl(fd, IOCTL_EVTCHN_UNBIND, &ub);
        close(fd);
        xb_seterr(err, "event channel: out of memory");
        return NULL;
    }
    r->base.ops = &real_evtchn_ops;
    r->base.fd = fd;
    r->base.local_port = (uint32_t)port;
    return &r->base;
}
