// ssebench: the stream-capacity benchmark's load, compiled so that it is not the bottleneck
// (a Python asyncio client saturates one core near 10,000 chunks a second).
//
//	ssebench upstream -addr 127.0.0.1:0         an SSE upstream; prints its port
//	ssebench client -url U -key K -streams N ... N concurrent streams; prints one JSON line
//
// The upstream answers every POST with a chat-completion-shaped SSE stream of x-bench-chunks
// events x-bench-gap-ms apart (on a fixed schedule: a late write does not delay the next),
// each stamped with the wall-clock nanoseconds at which it was written ("sent_ns"). The
// client subtracts the stamp from each event's arrival: the chunk's delay. What a proxy adds
// is its delay distribution minus the upstream-direct one, measured in the same run.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ssebench upstream|client [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "upstream":
		upstream(os.Args[2:])
	case "client":
		client(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "usage: ssebench upstream|client [flags]")
		os.Exit(2)
	}
}

// ---------------------------------------------------------------- upstream

func header(r *http.Request, name string, fallback int) int {
	if v, err := strconv.Atoi(r.Header.Get(name)); err == nil && v >= 0 {
		return v
	}
	return fallback
}

func serveStream(w http.ResponseWriter, r *http.Request) {
	io.Copy(io.Discard, r.Body)
	chunks := header(r, "x-bench-chunks", 100)
	gap := time.Duration(header(r, "x-bench-gap-ms", 20)) * time.Millisecond
	flusher, _ := w.(http.Flusher)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(200)
	flusher.Flush()
	start := time.Now()
	var buf bytes.Buffer
	for i := 0; i < chunks; i++ {
		if i > 0 {
			if wait := time.Until(start.Add(time.Duration(i) * gap)); wait > 0 {
				time.Sleep(wait)
			}
		}
		buf.Reset()
		fmt.Fprintf(&buf, `data: {"id":"chatcmpl-bench","object":"chat.completion.chunk",`+
			`"created":0,"model":"bench","sent_ns":%d,"choices":[{"index":0,`+
			`"delta":{"content":"tok%d "},"logprobs":null,"finish_reason":null}]}`+"\n\n",
			time.Now().UnixNano(), i)
		if _, err := w.Write(buf.Bytes()); err != nil {
			return
		}
		flusher.Flush()
	}
	w.Write([]byte("data: [DONE]\n\n"))
}

func upstream(args []string) {
	fs := flag.NewFlagSet("upstream", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "listen address (loopback)")
	cert := fs.String("tls-cert", "", "serve https with this certificate (PEM; with -tls-key)")
	key := fs.String("tls-key", "", "the certificate's private key (PEM)")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	srv := &http.Server{Handler: http.HandlerFunc(serveStream)}
	if *cert != "" {
		srv.ServeTLS(ln, *cert, *key)
		return
	}
	srv.Serve(ln)
}

// ---------------------------------------------------------------- client

type stream struct {
	ttfb    time.Duration // request start to the first event
	delays  []time.Duration
	failed  string
	elapsed time.Duration
}

var stamp = []byte(`"sent_ns":`)

func run(c *http.Client, url, key string, chunks, gapMs int) stream {
	var s stream
	started := time.Now()
	body := []byte(`{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}]}`)
	req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("x-bench-chunks", strconv.Itoa(chunks))
	req.Header.Set("x-bench-gap-ms", strconv.Itoa(gapMs))
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := c.Do(req)
	if err != nil {
		s.failed = err.Error()
		return s
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		s.failed = "status " + strconv.Itoa(resp.StatusCode)
		io.Copy(io.Discard, resp.Body)
		return s
	}
	reader := bufio.NewReaderSize(resp.Body, 64*1024)
	done := false
	for {
		line, err := reader.ReadSlice('\n')
		now := time.Now()
		if len(line) > 6 && bytes.HasPrefix(line, []byte("data: ")) {
			if bytes.HasPrefix(line[6:], []byte("[DONE]")) {
				done = true
			} else if i := bytes.Index(line, stamp); i >= 0 {
				rest := line[i+len(stamp):]
				end := bytes.IndexByte(rest, ',')
				if sent, perr := strconv.ParseInt(string(rest[:end]), 10, 64); perr == nil && end > 0 {
					if len(s.delays) == 0 {
						s.ttfb = now.Sub(started)
					}
					s.delays = append(s.delays, time.Duration(now.UnixNano()-sent))
				}
			}
		}
		if err != nil {
			if err != io.EOF {
				s.failed = err.Error()
			}
			break
		}
	}
	s.elapsed = time.Since(started)
	if s.failed == "" && (!done || len(s.delays) != chunks) {
		s.failed = fmt.Sprintf("incomplete: %d of %d events, done=%v", len(s.delays), chunks, done)
	}
	return s
}

func percentiles(values []time.Duration) map[string]float64 {
	out := map[string]float64{}
	if len(values) == 0 {
		return out
	}
	sort.Slice(values, func(i, j int) bool { return values[i] < values[j] })
	at := func(q float64) float64 {
		i := int(q * float64(len(values)-1))
		return float64(values[i]) / 1e6 // ms
	}
	out["p50_ms"], out["p99_ms"], out["p999_ms"], out["max_ms"] = at(0.5), at(0.99), at(0.999), at(1)
	return out
}

func client(args []string) {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	url := fs.String("url", "", "the stream URL (a /v1/chat/completions)")
	key := fs.String("key", "", "API key (sent as Bearer)")
	n := fs.Int("streams", 100, "concurrent streams")
	chunks := fs.Int("chunks", 100, "events per stream")
	gap := fs.Int("gap-ms", 20, "ms between events")
	ramp := fs.Int("ramp-ms", 1000, "streams start evenly over this many ms")
	fs.Parse(args)
	transport := &http.Transport{
		MaxIdleConnsPerHost: *n, MaxConnsPerHost: *n, DisableCompression: true,
		ResponseHeaderTimeout: 60 * time.Second,
	}
	c := &http.Client{Transport: transport, Timeout: 300 * time.Second}
	results := make([]stream, *n)
	var wg sync.WaitGroup
	began := time.Now()
	for i := 0; i < *n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if *n > 1 {
				time.Sleep(time.Duration(*ramp) * time.Millisecond * time.Duration(i) / time.Duration(*n))
			}
			results[i] = run(c, *url, *key, *chunks, *gap)
		}(i)
	}
	wg.Wait()
	var delays, ttfbs []time.Duration
	failed := 0
	firstFailure := ""
	for _, r := range results {
		if r.failed != "" {
			failed++
			if firstFailure == "" {
				firstFailure = r.failed
			}
		}
		delays = append(delays, r.delays...)
		if len(r.delays) > 0 {
			ttfbs = append(ttfbs, r.ttfb)
		}
	}
	out := map[string]any{
		"streams": *n, "events": len(delays), "failed_streams": failed,
		"first_failure": firstFailure, "wall_s": time.Since(began).Seconds(),
		"delay": percentiles(delays), "ttfb": percentiles(ttfbs),
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
