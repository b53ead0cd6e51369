package compose

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Images are built here, with no registry: nats-server and sluice's services as
// static binaries in scratch images (Dockerfile.scratch), ClickHouse from a Debian
// bookworm root filesystem made with debootstrap (Debian's clickhouse-server, the
// same apt archive the machine uses), brought in with docker import. The
// ClickHouse image is kept between runs (it takes a couple of minutes); the others
// are rebuilt each run from the tree under test.

// scratchImages are the images of static binaries: name and Go package.
var scratchImages = map[string]string{
	"nats":     "github.com/nats-io/nats-server/v2",
	"pipeline": "github.com/sluicehq/sluice/services/pipeline/cmd/pipeline",
	"notify":   "github.com/sluicehq/sluice/services/notify/cmd/notify",
	"sink":     "github.com/sluicehq/sluice/services/sink/cmd/sink",
	"sluice":   "github.com/sluicehq/sluice/services/sluice/cmd/sluice",
}

// rootImages run as root: nats-server reads the certs step's keys, which are
// root's (as in the official image, which runs as root).
var rootImages = map[string]bool{"nats": true}

// clickhouseImage is the ClickHouse image's tag: named after what the suite puts in
// it, so a change of those makes a new image.
var clickhouseImage = func() string {
	sum := sha256.Sum256([]byte(clickhouseConfig + clickhouseEntrypoint))
	return "sluice-test/clickhouse:" + hex.EncodeToString(sum[:6])
}()

func buildImages() error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "sluice-compose-images-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	for name, pkg := range scratchImages {
		ctxDir := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Join(ctxDir, "state"), 0o755); err != nil {
			return err
		}
		if _, err := run(ctx, []string{"CGO_ENABLED=0"}, "go", "build", "-trimpath", "-o", filepath.Join(ctxDir, "service"), pkg); err != nil {
			return err
		}
		uid := "65532"
		if rootImages[name] {
			uid = "0"
		}
		if _, err := run(ctx, nil, "docker", "build", "--quiet", "-f", filepath.Join(repoRoot, "test", "compose", "Dockerfile.scratch"),
			"--build-arg", "UID="+uid, "-t", "sluice-test/"+name+":local", ctxDir); err != nil {
			return err
		}
	}
	if _, err := run(ctx, nil, "docker", "image", "inspect", clickhouseImage); err == nil {
		return nil
	}
	return buildClickHouse(ctx, dir)
}

// clickhouseConfig makes the server listen on every address of its container and
// log to the console (docker compose logs).
const clickhouseConfig = `<yandex>
    <listen_host>0.0.0.0</listen_host>
    <logger>
        <console>1</console>
        <level>warning</level>
    </logger>
</yandex>
`

func buildClickHouse(ctx context.Context, dir string) error {
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return fmt.Errorf("debootstrap is missing: run `make docker` (installs it from Debian's archive)")
	}
	root := filepath.Join(dir, "clickhouse-rootfs")
	fmt.Fprintf(os.Stderr, "compose suite: building %s from Debian bookworm with debootstrap (about two minutes, once)\n", clickhouseImage)
	if _, err := run(ctx, nil, "debootstrap", "--variant=minbase", "--include=clickhouse-server,clickhouse-client", "bookworm", root, debianMirror()); err != nil {
		return err
	}
	// What the image does not need: docs, man pages, apt's lists.
	for _, p := range []string{"usr/share/doc", "usr/share/man", "usr/share/locale", "var/lib/apt/lists", "var/cache/apt"} {
		_ = os.RemoveAll(filepath.Join(root, p))
	}
	confd := filepath.Join(root, "etc", "clickhouse-server", "config.d")
	if err := os.MkdirAll(confd, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(confd, "docker.xml"), []byte(clickhouseConfig), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "entrypoint.sh"), []byte(clickhouseEntrypoint), 0o755); err != nil {
		return err
	}
	cmd := fmt.Sprintf("tar -C %q -c . | docker import --change 'CMD [\"/entrypoint.sh\"]' - %s", root, clickhouseImage)
	_, err := run(ctx, nil, "sh", "-c", cmd)
	return err
}

// clickhouseEntrypoint starts the server as the official image does with
// CLICKHOUSE_USER and CLICKHOUSE_PASSWORD: that user, with that password, in place of
// the default user (open, without a password).
const clickhouseEntrypoint = `#!/bin/sh
set -e
if [ -n "$CLICKHOUSE_PASSWORD" ]; then
	user=${CLICKHOUSE_USER:-default}
	hash=$(printf '%s' "$CLICKHOUSE_PASSWORD" | sha256sum | cut -d' ' -f1)
	mkdir -p /etc/clickhouse-server/users.d
	cat > /etc/clickhouse-server/users.d/sluice-user.xml <<XML
<yandex><users>
    <default remove="remove"/>
    <$user>
        <password_sha256_hex>$hash</password_sha256_hex>
        <networks><ip>::/0</ip></networks>
        <profile>default</profile>
        <quota>default</quota>
    </$user>
</users></yandex>
XML
fi
exec /usr/sbin/clickhouse-server --config-file=/etc/clickhouse-server/config.xml
`

// debianMirror is the first Debian archive the machine's apt uses.
func debianMirror() string {
	for _, path := range []string{"/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"} {
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			switch {
			case len(fields) >= 2 && fields[0] == "URIs:" && strings.HasSuffix(fields[1], "/debian"):
				f.Close()
				return fields[1]
			case len(fields) >= 3 && fields[0] == "deb" && strings.HasSuffix(fields[1], "/debian"):
				f.Close()
				return fields[1]
			}
		}
		f.Close()
	}
	return "http://deb.debian.org/debian"
}
