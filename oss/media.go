package oss

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"image"
	"image/gif"
	"image/jpeg"
	"image/png"
	"io"
	"strings"
	"time"

	"golang.org/x/image/webp"

	"github.com/comfyfarm/comfyfarm/schema"
)

const octetStream = "application/octet-stream"

// SniffLen is how many leading bytes Sniff needs to recognise every type it
// knows.
const SniffLen = 64

// media is one recognised type: its content type and file extension.
type media struct{ contentType, ext string }

var (
	mediaPNG  = media{"image/png", "png"}
	mediaJPEG = media{"image/jpeg", "jpg"}
	mediaGIF  = media{"image/gif", "gif"}
	mediaWebP = media{"image/webp", "webp"}
	mediaAVIF = media{"image/avif", "avif"}
	mediaMP4  = media{"video/mp4", "mp4"}
	mediaMOV  = media{"video/quicktime", "mov"}
	mediaM4A  = media{"audio/mp4", "m4a"}
	mediaWebM = media{"video/webm", "webm"}
	mediaMKV  = media{"video/x-matroska", "mkv"}
	mediaMP3  = media{"audio/mpeg", "mp3"}
	mediaWAV  = media{"audio/wav", "wav"}
	mediaFLAC = media{"audio/flac", "flac"}
	mediaOGG  = media{"audio/ogg", "ogg"}
	mediaGLB  = media{"model/gltf-binary", "glb"}
	mediaBin  = media{octetStream, "bin"}
)

// typeByExt maps the extensions Sniff produces (and a few spellings of them)
// to content types; used when a Put names no content type.
var typeByExt = map[string]string{
	"png": mediaPNG.contentType, "jpg": mediaJPEG.contentType, "jpeg": mediaJPEG.contentType,
	"gif": mediaGIF.contentType, "webp": mediaWebP.contentType, "avif": mediaAVIF.contentType,
	"mp4": mediaMP4.contentType, "mov": mediaMOV.contentType, "m4a": mediaM4A.contentType,
	"webm": mediaWebM.contentType, "mkv": mediaMKV.contentType, "mp3": mediaMP3.contentType,
	"wav": mediaWAV.contentType, "flac": mediaFLAC.contentType, "ogg": mediaOGG.contentType,
	"glb": mediaGLB.contentType, "json": "application/json", "txt": "text/plain; charset=utf-8",
	"bin": octetStream,
}

// Sniff names the media type of a file from its leading bytes (SniffLen of
// them suffice): PNG, JPEG, GIF, WebP, AVIF, MP4/MOV/M4A, WebM/Matroska, MP3,
// WAV, FLAC, Ogg and glTF binary. Anything else is application/octet-stream
// with extension "bin". The set is closed on purpose: outputs are stored and
// served under these types only.
func Sniff(head []byte) (contentType, ext string) {
	m := sniff(head)
	return m.contentType, m.ext
}

func sniff(b []byte) media {
	switch {
	case bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")):
		return mediaPNG
	case bytes.HasPrefix(b, []byte{0xFF, 0xD8, 0xFF}):
		return mediaJPEG
	case bytes.HasPrefix(b, []byte("GIF87a")), bytes.HasPrefix(b, []byte("GIF89a")):
		return mediaGIF
	case len(b) >= 12 && string(b[0:4]) == "RIFF" && string(b[8:12]) == "WEBP":
		return mediaWebP
	case len(b) >= 12 && string(b[0:4]) == "RIFF" && string(b[8:12]) == "WAVE":
		return mediaWAV
	case len(b) >= 12 && string(b[4:8]) == "ftyp":
		switch string(b[8:12]) {
		case "avif", "avis":
			return mediaAVIF
		case "qt  ":
			return mediaMOV
		case "M4A ", "M4B ":
			return mediaM4A
		}
		return mediaMP4
	case bytes.HasPrefix(b, []byte{0x1A, 0x45, 0xDF, 0xA3}):
		if bytes.Contains(b[:min(len(b), SniffLen)], []byte("webm")) {
			return mediaWebM
		}
		return mediaMKV
	case bytes.HasPrefix(b, []byte("fLaC")):
		return mediaFLAC
	case bytes.HasPrefix(b, []byte("OggS\x00")):
		return mediaOGG
	case len(b) >= 8 && string(b[0:4]) == "glTF" && binary.LittleEndian.Uint32(b[4:8]) == 2:
		return mediaGLB
	case bytes.HasPrefix(b, []byte("ID3")):
		return mediaMP3
	case len(b) >= 3 && isMP3Frame(b):
		return mediaMP3
	}
	return mediaBin
}

// isMP3Frame reports whether b starts with an MPEG audio layer III frame
// header (no ID3 tag): 11 sync bits, a known version, layer III, a bitrate
// index other than "free"/"bad" and a known sample rate.
func isMP3Frame(b []byte) bool {
	if b[0] != 0xFF || b[1]&0xE0 != 0xE0 {
		return false
	}
	version := (b[1] >> 3) & 3
	layer := (b[1] >> 1) & 3
	bitrate := b[2] >> 4
	rate := (b[2] >> 2) & 3
	return version != 1 && layer == 1 && bitrate != 0 && bitrate != 15 && rate != 3
}

// SafeExt returns ext (with or without a leading dot) in lower case when it is
// 1 to 8 ASCII letters or digits, else "bin". Its result is safe in an object
// key or a file name.
func SafeExt(ext string) string {
	ext = strings.ToLower(strings.TrimPrefix(ext, "."))
	if ext == "" || len(ext) > 8 {
		return "bin"
	}
	for i := 0; i < len(ext); i++ {
		c := ext[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return "bin"
		}
	}
	return ext
}

// ObjectKey builds the storage key of one job output:
// <frontend>/<yyyy>/<mm>/<dd>/<job_id>/<index>.<ext>, the date taken from t
// in UTC and ext passed through SafeExt. The result passes ValidKey when
// frontend and jobID are well-formed names (schema.ValidFrontendName, ULIDs).
func ObjectKey(frontend string, t time.Time, jobID string, index int, ext string) string {
	t = t.UTC()
	return fmt.Sprintf("%s/%04d/%02d/%02d/%s/%d.%s", frontend, t.Year(), int(t.Month()), t.Day(), jobID, index, SafeExt(ext))
}

// ImageMeta is what an image's header tells.
type ImageMeta struct {
	ContentType string
	Width       int
	Height      int
	Ext         string // as Sniff names it: "png", "jpg", "gif", "webp"
}

// Pixels is Width × Height.
func (m ImageMeta) Pixels() int64 { return int64(m.Width) * int64(m.Height) }

// maxHeaderBytes bounds how much ImageInfo reads looking for the dimensions:
// JPEG may carry large EXIF/ICC segments before its frame header.
const maxHeaderBytes = 1 << 20

var errHeaderTooLong = errors.New("image header longer than 1 MiB")

// ImageInfo reads an image's header (PNG, JPEG, GIF or WebP) and returns its
// type and dimensions without decoding any pixels. It reads at most 1 MiB of
// r. Other types give an error matching schema.ErrUnsupportedMedia.
func ImageInfo(r io.Reader) (ImageMeta, error) {
	lr := &io.LimitedReader{R: r, N: maxHeaderBytes}
	br := bufio.NewReaderSize(lr, 4096)
	head, _ := br.Peek(SniffLen)
	m := sniff(head)
	var decode func(io.Reader) (image.Config, error)
	switch m {
	case mediaPNG:
		decode = png.DecodeConfig
	case mediaJPEG:
		decode = jpeg.DecodeConfig
	case mediaGIF:
		decode = gif.DecodeConfig
	case mediaWebP:
		decode = webp.DecodeConfig
	default:
		return ImageMeta{}, fmt.Errorf("%w: %s is not an image this service reads", schema.ErrUnsupportedMedia, m.contentType)
	}
	cfg, err := decode(br)
	if err != nil {
		if lr.N == 0 {
			err = errHeaderTooLong
		}
		return ImageMeta{}, fmt.Errorf("%w: bad %s header: %v", schema.ErrUnsupportedMedia, m.ext, err)
	}
	if cfg.Width <= 0 || cfg.Height <= 0 {
		return ImageMeta{}, fmt.Errorf("%w: %s header gives %dx%d", schema.ErrUnsupportedMedia, m.ext, cfg.Width, cfg.Height)
	}
	return ImageMeta{ContentType: m.contentType, Width: cfg.Width, Height: cfg.Height, Ext: m.ext}, nil
}

// CheckInputImage validates an uploaded input image read from r and returns
// its header facts. Only PNG, JPEG and WebP are accepted (others, or a file
// whose bytes do not match its claimed type, give schema.ErrUnsupportedMedia).
// More than maxBytes gives schema.ErrTooLarge. More than maxPixels (read from
// the header, before anything is decoded) gives schema.ErrTooLarge naming the
// dimensions. A limit <= 0 is not checked. r is read to its end (at most
// maxBytes+1 bytes) to measure it; callers pass a reader over bytes they
// already hold.
//
// Only the header is parsed: a file with a valid header and a corrupt body
// passes, and fails later in the workflow that loads it.
func CheckInputImage(r io.Reader, maxBytes, maxPixels int64) (ImageMeta, error) {
	if maxBytes > 0 {
		r = io.LimitReader(r, maxBytes+1)
	}
	cr := &countingReader{r: r}
	meta, err := ImageInfo(cr)
	tooLarge := func() bool { return maxBytes > 0 && cr.n > maxBytes }
	if err != nil {
		if tooLarge() {
			return ImageMeta{}, fmt.Errorf("%w: image larger than %d bytes", schema.ErrTooLarge, maxBytes)
		}
		return ImageMeta{}, err
	}
	switch meta.ContentType {
	case mediaPNG.contentType, mediaJPEG.contentType, mediaWebP.contentType:
	default:
		return ImageMeta{}, fmt.Errorf("%w: %s (want PNG, JPEG or WebP)", schema.ErrUnsupportedMedia, meta.ContentType)
	}
	if maxPixels > 0 && meta.Pixels() > maxPixels {
		return ImageMeta{}, fmt.Errorf("%w: image is %dx%d (%d pixels), limit %d pixels",
			schema.ErrTooLarge, meta.Width, meta.Height, meta.Pixels(), maxPixels)
	}
	if _, err := io.Copy(io.Discard, cr); err != nil {
		return ImageMeta{}, fmt.Errorf("read image: %w", err)
	}
	if tooLarge() {
		return ImageMeta{}, fmt.Errorf("%w: image larger than %d bytes", schema.ErrTooLarge, maxBytes)
	}
	return meta, nil
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
