/* gatehouse.sg._mmsg: batched datagram I/O for the SG's UDP relay (recvmmsg/sendmmsg, which the
 * Python standard library lacks). One system call moves up to BATCH datagrams, so the relay's
 * per-datagram cost is the kernel's copy and one dictionary lookup in Python.
 *
 * recv(fd, max) -> [(data, address), ...]
 *     Up to max (at most BATCH) datagrams waiting on the non-blocking socket fd; [] when none.
 *     Addresses have the socket module's shape: (host, port) or (host, port, flowinfo, scope_id).
 *     Other errors (e.g. ECONNREFUSED from an earlier send on a connected socket) raise OSError.
 * send(fd, datagrams, address=None, segment=False) -> (sent, busy, failed, refused)
 *     Each datagram of the list, in order, to address (or to the connected peer when None).
 *     Stops at EAGAIN: "busy" is how many were left unsent then. A datagram refused with any
 *     other error is skipped and counted in "failed" (the error is the socket's pending one,
 *     reported once), and the rest are still sent. Never raises for a send error.
 *     segment: runs of equal-sized datagrams go as one send with UDP_SEGMENT (UDP GSO: the
 *     kernel splits it into those datagrams, a third of the kernel time of a datagram each);
 *     "refused" counts the runs the path would not segment, which were then sent one by one.
 *
 * Invariants: the buffers are this module's (one process runs one event loop thread); a datagram
 * is copied once into a bytes object on receipt and sent from that object without a copy; no
 * call blocks (MSG_DONTWAIT).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <string.h>
#include <sys/socket.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103 /* linux/udp.h, Linux 4.18 */
#endif

#define BATCH 32
#define SLOT 65536 /* the largest UDP payload fits: a datagram is never truncated */
#define MAX_SEGMENTS 64 /* UDP_MAX_SEGMENTS of Linux 4.18 */
#define GSO_BYTES 65000 /* under the 65,507-byte UDP payload limit of one send */

static char *buffers;
static struct mmsghdr msgs[BATCH];
static struct iovec iovs[BATCH];
static struct sockaddr_storage names[BATCH];

static PyObject *
make_address(const struct sockaddr_storage *name)
{
    char host[INET6_ADDRSTRLEN];
    if (name->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)name;
        inet_ntop(AF_INET, &v4->sin_addr, host, sizeof(host));
        return Py_BuildValue("(si)", host, ntohs(v4->sin_port));
    }
    if (name->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)name;
        inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof(host));
        return Py_BuildValue("(siII)", host, ntohs(v6->sin6_port), ntohl(v6->sin6_flowinfo),
                             v6->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

static PyObject *
mmsg_recv(PyObject *module, PyObject *args)
{
    int fd, max, n, i;
    PyObject *out;

    if (!PyArg_ParseTuple(args, "ii:recv", &fd, &max))
        return NULL;
    if (max < 1 || max > BATCH)
        max = BATCH;
    if (buffers == NULL) {
        buffers = PyMem_RawMalloc((size_t)BATCH * SLOT);
        if (buffers == NULL)
            return PyErr_NoMemory();
    }
    for (i = 0; i < max; i++) {
        iovs[i].iov_base = buffers + (size_t)i * SLOT;
        iovs[i].iov_len = SLOT;
        memset(&msgs[i].msg_hdr, 0, sizeof(msgs[i].msg_hdr));
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_namelen = sizeof(names[i]);
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    do {
        n = recvmmsg(fd, msgs, (unsigned int)max, MSG_DONTWAIT, NULL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        PyObject *data = PyBytes_FromStringAndSize(iovs[i].iov_base, msgs[i].msg_len);
        PyObject *address = data ? make_address(&names[i]) : NULL;
        PyObject *item = address ? PyTuple_Pack(2, data, address) : NULL;
        Py_XDECREF(data);
        Py_XDECREF(address);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

static int
parse_address(PyObject *address, struct sockaddr_storage *name, socklen_t *length)
{
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope_id = 0;

    memset(name, 0, sizeof(*name));
    if (!PyArg_ParseTuple(address, "si|II:address", &host, &port, &flowinfo, &scope_id))
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    if (PyTuple_GET_SIZE(address) == 2 && strchr(host, ':') == NULL) {
        struct sockaddr_in *v4 = (struct sockaddr_in *)name;
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
            *length = sizeof(*v4);
            return 0;
        }
    } else {
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)name;
        char plain[INET6_ADDRSTRLEN];
        const char *scope = strchr(host, '%');
        size_t size = scope ? (size_t)(scope - host) : strlen(host);
        if (size < sizeof(plain)) {
            memcpy(plain, host, size);
            plain[size] = '\0';
            v6->sin6_family = AF_INET6;
            v6->sin6_port = htons((uint16_t)port);
            v6->sin6_flowinfo = htonl(flowinfo);
            v6->sin6_scope_id = scope_id;
            if (inet_pton(AF_INET6, plain, &v6->sin6_addr) == 1) {
                *length = sizeof(*v6);
                return 0;
            }
        }
    }
    PyErr_Format(PyExc_ValueError, "not a numeric IP address: %s", host);
    return -1;
}

/* sendmmsg of datagrams[start:end], in order: what was sent, skipped (failed) or left (busy). */
struct outcome {
    Py_ssize_t sent, failed, refused;
    int busy; /* stopped at EAGAIN: the rest is unsent */
};

static Py_ssize_t
send_plain(int fd, PyObject *datagrams, Py_ssize_t start, Py_ssize_t end,
           struct sockaddr_storage *name, socklen_t length, struct outcome *out)
{
    Py_ssize_t done = start;
    while (done < end) {
        int chunk = (int)(end - done < BATCH ? end - done : BATCH), i, n;
        struct mmsghdr msgv[BATCH];
        struct iovec parts[BATCH];
        for (i = 0; i < chunk; i++) {
            PyObject *data = PyList_GET_ITEM(datagrams, done + i);
            parts[i].iov_base = PyBytes_AS_STRING(data);
            parts[i].iov_len = (size_t)PyBytes_GET_SIZE(data);
            memset(&msgv[i].msg_hdr, 0, sizeof(msgv[i].msg_hdr));
            msgv[i].msg_hdr.msg_iov = &parts[i];
            msgv[i].msg_hdr.msg_iovlen = 1;
            msgv[i].msg_hdr.msg_name = name;
            msgv[i].msg_hdr.msg_namelen = length;
        }
        n = sendmmsg(fd, msgv, (unsigned int)chunk, MSG_DONTWAIT);
        if (n > 0) {
            done += n;
            out->sent += n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            out->busy = 1;
            break;
        } else {
            done += 1; /* this one met the socket's pending error (or was refused): skip it */
            out->failed += 1;
        }
    }
    return done;
}

/* The end of the run of datagrams from start that one UDP_SEGMENT send can carry: equal sizes,
 * the last one possibly shorter, at most MAX_SEGMENTS and GSO_BYTES in all. */
static Py_ssize_t
run_end(PyObject *datagrams, Py_ssize_t start, Py_ssize_t count)
{
    Py_ssize_t size = PyBytes_GET_SIZE(PyList_GET_ITEM(datagrams, start)), total = size, end = start + 1;
    while (end < count && end - start < MAX_SEGMENTS) {
        Py_ssize_t next = PyBytes_GET_SIZE(PyList_GET_ITEM(datagrams, end));
        if (next > size || next == 0 || total + next > GSO_BYTES)
            break;
        total += next;
        end++;
        if (next < size)
            break;
    }
    return end;
}

static PyObject *
mmsg_send(PyObject *module, PyObject *args)
{
    int fd, segment = 0;
    PyObject *datagrams, *address = Py_None;
    struct sockaddr_storage storage;
    struct sockaddr_storage *name = NULL;
    socklen_t length = 0;
    Py_ssize_t count, done = 0, i;
    struct outcome out = {0, 0, 0, 0};

    if (!PyArg_ParseTuple(args, "iO!|Op:send", &fd, &PyList_Type, &datagrams, &address, &segment))
        return NULL;
    if (address != Py_None) {
        if (parse_address(address, &storage, &length) < 0)
            return NULL;
        name = &storage;
    }
    count = PyList_GET_SIZE(datagrams);
    for (i = 0; i < count; i++) {
        if (!PyBytes_Check(PyList_GET_ITEM(datagrams, i))) {
            PyErr_SetString(PyExc_TypeError, "datagrams must be bytes");
            return NULL;
        }
    }
    while (done < count && !out.busy) {
        Py_ssize_t end = segment ? run_end(datagrams, done, count) : count;
        if (end - done >= 2 && segment) {
            struct iovec parts[MAX_SEGMENTS];
            union {
                char buf[CMSG_SPACE(sizeof(uint16_t))];
                struct cmsghdr align;
            } control;
            struct msghdr msg;
            struct cmsghdr *cmsg;
            uint16_t size = (uint16_t)PyBytes_GET_SIZE(PyList_GET_ITEM(datagrams, done));
            ssize_t n;
            for (i = done; i < end; i++) {
                PyObject *data = PyList_GET_ITEM(datagrams, i);
                parts[i - done].iov_base = PyBytes_AS_STRING(data);
                parts[i - done].iov_len = (size_t)PyBytes_GET_SIZE(data);
            }
            memset(&msg, 0, sizeof(msg));
            memset(&control, 0, sizeof(control));
            msg.msg_name = name;
            msg.msg_namelen = length;
            msg.msg_iov = parts;
            msg.msg_iovlen = (size_t)(end - done);
            msg.msg_control = control.buf;
            msg.msg_controllen = sizeof(control.buf);
            cmsg = CMSG_FIRSTHDR(&msg);
            cmsg->cmsg_level = SOL_UDP;
            cmsg->cmsg_type = UDP_SEGMENT;
            cmsg->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            memcpy(CMSG_DATA(cmsg), &size, sizeof(size));
            do {
                n = sendmsg(fd, &msg, MSG_DONTWAIT);
            } while (n < 0 && errno == EINTR);
            if (n >= 0) {
                out.sent += end - done;
                done = end;
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                out.busy = 1;
                break;
            }
            if (errno == EIO || errno == EINVAL || errno == EMSGSIZE || errno == ENOPROTOOPT ||
                errno == EOPNOTSUPP) {
                /* No segmentation on this path (an old kernel, a device without checksum
                 * offload, a segment over the path MTU): this call goes on one by one. */
                out.refused += 1;
                segment = 0;
                end = count;
            }
            /* Else the socket's pending error (reported once): this run goes one by one. */
        }
        done = send_plain(fd, datagrams, done, end, name, length, &out);
    }
    return Py_BuildValue("(nnnn)", out.sent, count - out.sent - out.failed, out.failed, out.refused);
}

static PyMethodDef methods[] = {
    {"recv", mmsg_recv, METH_VARARGS, "recv(fd, max) -> [(data, address), ...]: up to max waiting datagrams."},
    {"send", mmsg_send, METH_VARARGS,
     "send(fd, datagrams, address=None) -> (sent, busy, failed): a list of datagrams in order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gatehouse.sg._mmsg", "Batched datagram I/O (recvmmsg/sendmmsg).", -1, methods,
};

PyMODINIT_FUNC
PyInit__mmsg(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "BATCH", BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
