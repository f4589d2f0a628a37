/* UDP load generator and counter for bench/sg_udp.py (a Python sender cannot offer 80,000/s here).
 *
 *   udpblast send HOST PORT RATE SECONDS SIZE [SRCPORT]   prints "sent achieved_rate"
 *   udpblast count PORT                                   prints the count for each stdin line
 *
 * The sender paces by the clock (what is due, in batches of at most 1 ms, via sendmmsg); the
 * counter drains its socket with recvmmsg. Both are bounded: send stops after SECONDS, count
 * stops at EOF on stdin.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int do_send(const char *host, int port, double rate, double seconds, int size, int srcport) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int buf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = htons(srcport)};
    inet_pton(AF_INET, "127.0.0.1", &src.sin_addr);
    if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0) { perror("bind"); return 1; }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &dst.sin_addr);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) != 0) { perror("connect"); return 1; }
    char *payload = calloc(1, size);
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = payload;
        iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    long long sent = 0;
    long cap = rate / 1000 > 1 ? (long)(rate / 1000) : 1;
    double start = now(), end = start + seconds, t;
    while ((t = now()) < end) {
        long long due = (long long)((t - start) * rate) - sent;
        if (due > cap) due = cap;
        if (due <= 0) {
            struct timespec ns = {0, 100000};
            nanosleep(&ns, NULL);
            continue;
        }
        while (due > 0) {
            int n = due > BATCH ? BATCH : (int)due;
            int got = sendmmsg(fd, msgs, n, 0);
            if (got <= 0) break; /* ECONNREFUSED etc.: counted as not sent */
            sent += got;
            due -= got;
        }
    }
    printf("%lld %.0f\n", sent, sent / (now() - start));
    return 0;
}

static int do_count(int port) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int buf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) { perror("bind"); return 1; }
    static char bufs[BATCH][2048];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    long long count = 0;
    printf("ready\n");
    fflush(stdout);
    struct pollfd fds[2] = {{.fd = fd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) continue;
        if (fds[0].revents & POLLIN) {
            int got = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
            if (got > 0) count += got;
        }
        if (fds[1].revents & (POLLIN | POLLHUP)) {
            char line[64];
            if (!fgets(line, sizeof line, stdin)) return 0;
            /* drain what is already queued before answering */
            int got;
            while ((got = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL)) > 0) count += got;
            printf("%lld\n", count);
            fflush(stdout);
        }
    }
}

int main(int argc, char **argv) {
    if (argc >= 7 && strcmp(argv[1], "send") == 0)
        return do_send(argv[2], atoi(argv[3]), atof(argv[4]), atof(argv[5]), atoi(argv[6]),
                       argc > 7 ? atoi(argv[7]) : 0);
    if (argc == 3 && strcmp(argv[1], "count") == 0) return do_count(atoi(argv[2]));
    fprintf(stderr, "usage: udpblast send HOST PORT RATE SECONDS SIZE [SRCPORT] | count PORT\n");
    return 2;
}
