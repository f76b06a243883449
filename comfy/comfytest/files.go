package comfytest

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"hash/crc32"
	"image"
	"image/color"
	_ "image/gif" // LoadImage accepts the formats PIL reads that the standard library decodes
	"image/jpeg"
	"image/png"
	"path"
	"sort"
	"strings"
	"sync"
	"time"
)

// The fake keeps ComfyUI's three folders in memory. Input and output survive
// Restart (they live on disk on a real server); temp is wiped, as ComfyUI
// wipes its temp folder at start-up.

const (
	kindInput  = "input"
	kindOutput = "output"
	kindTemp   = "temp"
)

type storedFile struct {
	data []byte
	mod  time.Time
}

type fileStore struct {
	mu    sync.Mutex
	files map[string]map[string]storedFile      // kind -> clean relative path -> file
	dirs  map[string]map[string]map[string]bool // kind -> folder ("" = root) -> entry names
}

func newFileStore() *fileStore {
	fs := &fileStore{files: map[string]map[string]storedFile{}, dirs: map[string]map[string]map[string]bool{}}
	for _, k := range []string{kindInput, kindOutput, kindTemp} {
		fs.wipeLocked(k)
	}
	return fs
}

func (fs *fileStore) put(kind, rel string, data []byte) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.files[kind][rel] = storedFile{data: data, mod: time.Now()}
	// Register the file and every folder above it in their parents.
	for p := rel; ; {
		dir, name := "", p
		if i := strings.LastIndex(p, "/"); i >= 0 {
			dir, name = p[:i], p[i+1:]
		}
		entries := fs.dirs[kind][dir]
		if entries == nil {
			entries = map[string]bool{}
			fs.dirs[kind][dir] = entries
		}
		if entries[name] {
			break
		}
		entries[name] = true
		if dir == "" {
			break
		}
		p = dir
	}
}

func (fs *fileStore) read(kind, rel string) (storedFile, bool) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f, ok := fs.files[kind][rel]
	return f, ok
}

func (fs *fileStore) exists(kind, rel string) bool {
	_, ok := fs.read(kind, rel)
	return ok
}

func (fs *fileStore) wipe(kind string) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.wipeLocked(kind)
}

func (fs *fileStore) wipeLocked(kind string) {
	fs.files[kind] = map[string]storedFile{}
	fs.dirs[kind] = map[string]map[string]bool{}
}

// list returns the names directly inside dir ("" is the folder itself):
// files and sub-folders, like os.listdir.
func (fs *fileStore) list(kind, dir string) []string {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if dir == "." {
		dir = ""
	}
	entries := fs.dirs[kind][dir]
	out := make([]string, 0, len(entries))
	for n := range entries {
		out = append(out, n)
	}
	return out
}

// imageList is LoadImage's combo: image files directly in the folder, sorted.
func (fs *fileStore) imageList(kind string) []any {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	var names []string
	for rel := range fs.files[kind] {
		if strings.Contains(rel, "/") {
			continue
		}
		switch strings.ToLower(path.Ext(rel)) {
		case ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff":
			names = append(names, rel)
		}
	}
	sort.Strings(names)
	return sortedAny(names)
}

// joinRel joins a folder-relative directory and name the way os.path.join and
// normpath do under a folder root, and reports whether the result stays inside
// the root. An absolute component escapes, as it does in Python.
func joinRel(parts ...string) (string, bool) {
	joined := ""
	for _, p := range parts {
		if strings.HasPrefix(p, "/") {
			return "", false
		}
		if p == "" {
			continue
		}
		if joined == "" {
			joined = p
		} else {
			joined = joined + "/" + p
		}
	}
	clean := path.Clean("/" + joined)
	// Reject paths whose lexical form walks above the root.
	depth := 0
	for _, seg := range strings.Split(joined, "/") {
		switch seg {
		case "", ".":
		case "..":
			depth--
			if depth < 0 {
				return "", false
			}
		default:
			depth++
		}
	}
	return strings.TrimPrefix(clean, "/"), true
}

// splitext is os.path.splitext.
func splitext(name string) (string, string) {
	base := name
	if i := strings.LastIndex(name, "/"); i >= 0 {
		base = name[i+1:]
	}
	dot := strings.LastIndex(base, ".")
	if dot <= 0 || strings.Trim(base[:dot], ".") == "" {
		return name, ""
	}
	cut := len(name) - len(base) + dot
	return name[:cut], name[cut:]
}

var zlibPool = sync.Pool{New: func() any {
	w, _ := zlib.NewWriterLevel(nil, zlib.BestSpeed)
	return w
}}

// pngChunk appends one PNG chunk.
func pngChunk(b *bytes.Buffer, typ string, data []byte) {
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(data)))
	b.Write(n[:])
	crc := crc32.NewIEEE()
	crc.Write([]byte(typ))
	crc.Write(data)
	b.WriteString(typ)
	b.Write(data)
	binary.BigEndian.PutUint32(n[:], crc.Sum32())
	b.Write(n[:])
}

// solidPNG encodes a w×h 8-bit RGB image of one colour, with tEXt chunks
// (ComfyUI stores "prompt" and "workflow" there). Rows after the first use the
// Up filter, so the encoder streams without holding the image in memory.
func solidPNG(w, h int, rgb [3]uint8, texts [][2]string) []byte {
	var b bytes.Buffer
	b.WriteString("\x89PNG\r\n\x1a\n")
	ihdr := make([]byte, 13)
	binary.BigEndian.PutUint32(ihdr[0:], uint32(w))
	binary.BigEndian.PutUint32(ihdr[4:], uint32(h))
	ihdr[8], ihdr[9] = 8, 2 // bit depth 8, colour type RGB
	pngChunk(&b, "IHDR", ihdr)
	for _, t := range texts {
		pngChunk(&b, "tEXt", append(append([]byte(t[0]), 0), latin1(t[1])...))
	}
	var z bytes.Buffer
	zw, _ := zlibPool.Get().(*zlib.Writer)
	zw.Reset(&z)
	defer zlibPool.Put(zw)
	row := make([]byte, 1+3*w)
	for x := 0; x < w; x++ {
		copy(row[1+3*x:], rgb[:])
	}
	zero := make([]byte, 1+3*w)
	zero[0] = 2 // Up
	for y := 0; y < h; y++ {
		if y == 0 {
			zw.Write(row)
		} else {
			zw.Write(zero)
		}
	}
	zw.Close()
	pngChunk(&b, "IDAT", z.Bytes())
	pngChunk(&b, "IEND", nil)
	return b.Bytes()
}

// latin1 maps text to ISO-8859-1 as PIL does for tEXt, replacing what it cannot
// represent.
func latin1(s string) []byte {
	out := make([]byte, 0, len(s))
	for _, r := range s {
		if r < 256 {
			out = append(out, byte(r))
		} else {
			out = append(out, '?')
		}
	}
	return out
}

// previewJPEG is a small JPEG of one colour, as a latent preview.
func previewJPEG(w, h int, rgb [3]uint8) []byte {
	w, h = containSize(w, h, 512)
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	c := color.RGBA{rgb[0], rgb[1], rgb[2], 255}
	for i := 0; i < len(img.Pix); i += 4 {
		img.Pix[i], img.Pix[i+1], img.Pix[i+2], img.Pix[i+3] = c.R, c.G, c.B, c.A
	}
	var b bytes.Buffer
	_ = jpeg.Encode(&b, img, &jpeg.Options{Quality: 95})
	return b.Bytes()
}

// containSize scales w×h down to fit max×max, keeping the aspect ratio.
func containSize(w, h, max int) (int, int) {
	if w <= 0 || h <= 0 {
		return 1, 1
	}
	if w <= max && h <= max {
		return w, h
	}
	if w >= h {
		return max, imax(1, h*max/w)
	}
	return imax(1, w*max/h), max
}

func imax(a, b int) int {
	if a > b {
		return a
	}
	return b
}

// decodeImageConfig reads the size of an uploaded image.
func decodeImageConfig(data []byte) (image.Config, error) {
	c, _, err := image.DecodeConfig(bytes.NewReader(data))
	return c, err
}

// reencodePNG re-encodes an image, keeping only RGB or only alpha.
func reencodePNG(data []byte, channel string) ([]byte, error) {
	img, _, err := image.Decode(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	bounds := img.Bounds()
	out := image.NewNRGBA(bounds)
	for y := bounds.Min.Y; y < bounds.Max.Y; y++ {
		for x := bounds.Min.X; x < bounds.Max.X; x++ {
			c := color.NRGBAModel.Convert(img.At(x, y)).(color.NRGBA)
			if channel == "a" {
				c = color.NRGBA{0, 0, 0, c.A}
			} else {
				c.A = 255
			}
			out.SetNRGBA(x, y, c)
		}
	}
	var b bytes.Buffer
	if err := png.Encode(&b, out); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// reencodeJPEG re-encodes an image as JPEG (GET /view?preview=jpeg;N).
func reencodeJPEG(data []byte, quality int) ([]byte, error) {
	img, _, err := image.Decode(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	if err := jpeg.Encode(&b, img, &jpeg.Options{Quality: quality}); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// applyMask copies the alpha channel of mask onto base (POST /upload/mask).
func applyMask(base, mask []byte) ([]byte, error) {
	bi, _, err := image.Decode(bytes.NewReader(base))
	if err != nil {
		return nil, err
	}
	mi, _, err := image.Decode(bytes.NewReader(mask))
	if err != nil {
		return nil, err
	}
	bounds := bi.Bounds()
	out := image.NewNRGBA(bounds)
	mb := mi.Bounds()
	for y := bounds.Min.Y; y < bounds.Max.Y; y++ {
		for x := bounds.Min.X; x < bounds.Max.X; x++ {
			c := color.NRGBAModel.Convert(bi.At(x, y)).(color.NRGBA)
			a := uint8(255)
			if p := image.Pt(x-bounds.Min.X+mb.Min.X, y-bounds.Min.Y+mb.Min.Y); p.In(mb) {
				a = color.NRGBAModel.Convert(mi.At(p.X, p.Y)).(color.NRGBA).A
			}
			c.A = a
			out.SetNRGBA(x, y, c)
		}
	}
	var b bytes.Buffer
	if err := png.Encode(&b, out); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// annotated resolves a file name the way folder_paths.annotated_filepath does:
// a " [output]", " [input]" or " [temp]" suffix picks the folder, otherwise
// def is used. It reports the folder, the relative path and whether the file
// exists.
func (fs *fileStore) annotated(name, def string) (string, bool) {
	kind, rel := splitAnnotation(name, def)
	clean, ok := joinRel(rel)
	if !ok {
		return kind, false
	}
	if fs.exists(kind, clean) {
		return kind, true
	}
	// os.path.exists is also true for a folder.
	return kind, len(fs.list(kind, clean)) > 0 && clean != ""
}

func splitAnnotation(name, def string) (kind, rel string) {
	cut := func(n int) string {
		if len(name) < n {
			return ""
		}
		return name[:len(name)-n]
	}
	switch {
	case strings.HasSuffix(name, "[output]"):
		return kindOutput, cut(9)
	case strings.HasSuffix(name, "[input]"):
		return kindInput, cut(8)
	case strings.HasSuffix(name, "[temp]"):
		return kindTemp, cut(7)
	}
	return def, name
}
