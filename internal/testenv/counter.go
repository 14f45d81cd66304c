package testenv

// CounterService, run in the built-in guest, serves a counter the guest
// keeps on its disk at /cgi-bin/n (busybox httpd's CGI): each request adds
// one and answers "N BOOT_ID". A protected VM's tests and benchmarks ask it
// across failovers: the counter must only grow, and the boot stay the same.
const CounterService = `mkdir -p /www/cgi-bin && cat > /www/cgi-bin/n <<'CGI'
#!/bin/sh
n=$(cat /data/n 2>/dev/null || echo 0)
n=$((n+1))
echo $n > /data/n.tmp && mv /data/n.tmp /data/n
printf 'Content-Type: text/plain\r\n\r\n%s %s\n' "$n" "$(cat /proc/sys/kernel/random/boot_id)"
CGI
chmod +x /www/cgi-bin/n`
