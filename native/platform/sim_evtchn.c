/*
 * A simulated interdomain event channel: two eventfds from the sim broker, one
 * the guest writes to notify us (ours to read), one we write to notify it.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "platform_int.h"

struct sim_evtchn {
    struct xb_evtchn base; /* base.fd is the receive eventfd */
    int send_fd;
};

static int sim_ack(struct xb_evtchn *ch)
{
    /* Poll first rather than set O_NONBLOCK: the eventfd's file status is shared with the guest's copy. */
    struct pollfd pfd = {.fd = ch->fd, .events = POLLIN};
    int r = poll(&pfd, 1, 0);
    if (r < 0)
        return -errno;
    if (r == 0 || !(pfd.revents & POLLIN))
        return 0;
    uint64_t count;
    ssize_t n = read(ch->fd, &count, sizeof count);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    if (n != sizeof count)
        return -EIO;
    return count > 0x7fffffff ? 0x7fffffff : (int)count;
}

static int sim_notify(struct xb_evtchn *ch)
{
    struct sim_evtchn *s = (struct sim_evtchn *)ch;
    uint64_t one = 1;
    ssize_t n = write(s->send_fd, &one, sizeof one);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno; /* counter saturated: the guest has a notification pending anyway */
    return n == sizeof one ? 0 : -EIO;
}

static void sim_close(struct xb_evtchn *ch)
{
    struct sim_evtchn *s = (struct sim_evtchn *)ch;
    close(s->base.fd);
    close(s->send_fd);
    free(s);
}

static const struct xb_evtchn_ops sim_evtchn_ops = {
    .ack = sim_ack,
    .notify = sim_notify,
    .close = sim_close,
};

/* Takes ownership of both fds on success; on failure the caller still owns them. */
struct xb_evtchn *xb_evtchn_sim(int recv_fd, int send_fd, uint32_t local_port, char *err)
{
    if (recv_fd < 0 || send_fd < 0) {
        xb_seterr(err, "sim event channel %u: bad fds (%d, %d)", local_port, recv_fd, send_fd);
        return NULL;
    }
    struct sim_evtchn *s = calloc(1, sizeof *s);
    if (!s) {
        xb_seterr(err, "sim event channel %u: out of memory", local_port);
        return NULL;
    }
    s->base.ops = &sim_evtchn_ops;
    s->base.fd = recv_fd;
    s->base.local_port = local_port;
    s->send_fd = send_fd;
    return &s->base;
}
