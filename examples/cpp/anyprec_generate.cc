// tvm-anyprec C++ example: load a compiled artifact with the TVM runtime, choose the bit-width at run time,
// and generate tokens greedily. No Python: the manifest (JSON) and the weights (safetensors) are read here.
//
//   anyprec_generate ARTIFACT_DIR --prompt-ids 1,2,3 [--bits 3,8] [--max-new-tokens 16] [--prompt-fn decode]
//
// --prompt-fn: the graph that feeds the prompt, "prefill" (default when the artifact has one: chunks of its
// width) or "decode" (token by token; cheaper for very short prompts, and under emulation).
//
// One load serves every bit-width: the weights are uploaded once, and each call passes the bit-width as an
// int32[1] tensor (the bitplane kernels read only the top b planes and the b-bit LUT). For each requested
// bit-width, prints one line "bits=<b> ids=<id> <id> ..." on stdout; timings go to stderr.
// Token ids in and out: tokenization is the app's business (the artifact's manifest names the tokenizer).
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

namespace {

const DLDevice kCPU{kDLCPU, 0};

// Host memory for tensors, 64-byte aligned as TVM's own allocator does.
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n ? n : 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

Tensor Empty(const std::vector<int64_t>& shape, DLDataType dtype) {
  return Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape), dtype, kCPU);
}

void CopyIn(const Tensor& t, const void* src, size_t nbytes) {
  int64_t numel = 1;
  for (int64_t d : t.shape()) numel *= d;
  if (nbytes != ffi::GetDataSize(static_cast<size_t>(numel), t.dtype()))
    throw std::runtime_error("size mismatch copying into a tensor");
  std::memcpy(t.data_ptr(), src, nbytes);
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

ffi::json::Object ParseObject(const std::string& text, const std::string& what) {
  ffi::String err;
  ffi::json::Value v = ffi::json::Parse(text, &err);
  if (!err.empty()) throw std::runtime_error(what + ": bad JSON: " + std::string(err));
  return v.cast<ffi::json::Object>();
}

int64_t Int(const ffi::json::Object& o, const char* key) { return o.at(ffi::String(key)).cast<int64_t>(); }

DLDataType SafetensorsDType(const std::string& s) {
  if (s == "F32") return DLDataType{kDLFloat, 32, 1};
  if (s == "F16") return DLDataType{kDLFloat, 16, 1};
  if (s == "U32") return DLDataType{kDLUInt, 32, 1};
  if (s == "I32") return DLDataType{kDLInt, 32, 1};
  if (s == "I64") return DLDataType{kDLInt, 64, 1};
  if (s == "U8") return DLDataType{kDLUInt, 8, 1};
  if (s == "I8") return DLDataType{kDLInt, 8, 1};   // int8 centroid tables (CPU kernel, int8 mode)
  throw std::runtime_error("unsupported safetensors dtype " + s);
}

// safetensors: u64 header length, JSON header {name: {dtype, shape, data_offsets}}, then the raw data.
std::map<std::string, Tensor> LoadSafetensors(const std::string& path) {
  std::string buf = ReadFile(path);
  if (buf.size() < 8) throw std::runtime_error(path + ": truncated");
  uint64_t n = 0;
  std::memcpy(&n, buf.data(), 8);  // little-endian, as on every target we build for
  if (8 + n > buf.size()) throw std::runtime_error(path + ": header runs past the end of the file");
  ffi::json::Object header = ParseObject(buf.substr(8, n), path);
  const char* data = buf.data() + 8 + n;
  size_t data_size = buf.size() - 8 - n;
  std::map<std::string, Tensor> out;
  for (const auto& kv : header) {
    std::string name = kv.first.cast<ffi::String>();
    if (name == "__metadata__") continue;
    auto info = kv.second.cast<ffi::json::Object>();
    std::vector<int64_t> shape;
    for (const auto& d : info.at(ffi::String("shape")).cast<ffi::json::Array>()) shape.push_back(d.cast<int64_t>());
    auto offs = info.at(ffi::String("data_offsets")).cast<ffi::json::Array>();
    int64_t begin = offs[0].cast<int64_t>(), end = offs[1].cast<int64_t>();
    if (begin < 0 || end < begin || static_cast<size_t>(end) > data_size)
      throw std::runtime_error(path + ": bad data_offsets for " + name);
    Tensor t = Empty(shape, SafetensorsDType(info.at(ffi::String("dtype")).cast<ffi::String>()));
    CopyIn(t, data + begin, static_cast<size_t>(end - begin));
    out.emplace(name, t);
  }
  return out;
}

Tensor Int64Tensor(const std::vector<int64_t>& values) {
  Tensor t = Empty({1, static_cast<int64_t>(values.size())}, DLDataType{kDLInt, 64, 1});
  CopyIn(t, values.data(), values.size() * sizeof(int64_t));
  return t;
}

Tensor Scalar1(int64_t v, DLDataType dt) {
  Tensor t = Empty({1}, dt);
  if (dt.bits == 64) {
    CopyIn(t, &v, 8);
  } else {
    int32_t w = static_cast<int32_t>(v);
    CopyIn(t, &w, 4);
  }
  return t;
}

struct Graph {
  ffi::Function fn;
  std::vector<Tensor> params;  // in the manifest's order
  int64_t chunk = 1;
};

class Model {
 public:
  explicit Model(const std::string& dir)
      : manifest_(ParseObject(ReadFile(dir + "/manifest.json"), dir + "/manifest.json")), vm_(LoadVM(dir)) {
    if (manifest_.at(ffi::String("kind")).cast<ffi::String>() != "compiled")
      throw std::runtime_error(dir + " is not a compiled artifact");
    for (const auto& b : manifest_.at(ffi::String("bit_widths")).cast<ffi::json::Array>())
      bit_widths_.push_back(b.cast<int64_t>());
    weights_ = LoadSafetensors(dir + "/weights.safetensors");
    auto functions = manifest_.at(ffi::String("functions")).cast<ffi::json::Object>();
    for (const char* name : {"decode", "prefill"}) {
      if (functions.count(ffi::String(name)) == 0) continue;
      auto info = functions.at(ffi::String(name)).cast<ffi::json::Object>();
      Graph g;
      g.fn = vm_->GetFunction(name).value();
      for (const auto& p : info.at(ffi::String("params")).cast<ffi::json::Array>()) {
        std::string pn = p.cast<ffi::String>();
        auto it = weights_.find(pn);
        if (it == weights_.end()) throw std::runtime_error("weights.safetensors lacks parameter " + pn);
        g.params.push_back(it->second);
      }
      auto spec = info.at(ffi::String("spec")).cast<ffi::json::Object>();
      g.chunk = Int(spec, "chunk");
      n_layers_ = Int(spec, "n_layers");
      n_kv_heads_ = Int(spec, "n_kv_heads");
      max_len_ = Int(spec, "max_len");
      head_dim_ = Int(spec, "head_dim");
      graphs_[name] = g;
    }
    if (!graphs_.count("decode")) throw std::runtime_error("artifact has no decode function");
  }

  const std::vector<int64_t>& bit_widths() const { return bit_widths_; }

  // Greedy decoding at `bits`: the prompt in chunks through prefill (or decode), then one token per step.
  std::vector<int64_t> Generate(const std::vector<int64_t>& prompt, int bits, int max_new,
                                const std::string& prompt_fn = "prefill") {
    bool ok = false;
    for (int64_t b : bit_widths_) ok |= (b == bits);
    if (!ok) throw std::runtime_error("bit-width " + std::to_string(bits) + " is not served by this artifact");
    Tensor nbits = Scalar1(bits, DLDataType{kDLInt, 32, 1});
    std::vector<Tensor> cache;
    for (int64_t i = 0; i < 2 * n_layers_; ++i) {
      Tensor z = Empty({n_kv_heads_, max_len_, head_dim_}, DLDataType{kDLFloat, 32, 1});
      std::memset(z.data_ptr(), 0, static_cast<size_t>(n_kv_heads_ * max_len_ * head_dim_) * 4);
      cache.push_back(z);
    }
    if (prompt_fn != "prefill" && prompt_fn != "decode")
      throw std::runtime_error("--prompt-fn must be prefill or decode, got " + prompt_fn);
    const Graph& pre = (prompt_fn == "prefill" && graphs_.count("prefill")) ? graphs_["prefill"] : graphs_["decode"];
    int64_t next = -1;
    for (size_t start = 0; start < prompt.size(); start += pre.chunk) {
      std::vector<int64_t> ids(pre.chunk, 0);
      size_t n = std::min<size_t>(pre.chunk, prompt.size() - start);
      std::copy(prompt.begin() + start, prompt.begin() + start + n, ids.begin());
      next = Step(pre, ids, static_cast<int64_t>(start), nbits, &cache, static_cast<int64_t>(n) - 1);
    }
    std::vector<int64_t> out;
    int64_t pos = static_cast<int64_t>(prompt.size());
    while (static_cast<int>(out.size()) < max_new) {
      out.push_back(next);
      if (pos >= max_len_ || static_cast<int>(out.size()) >= max_new) break;
      next = Step(graphs_["decode"], {next}, pos, nbits, &cache, 0);
      ++pos;
    }
    return out;
  }

 private:
  static ffi::Module LoadVM(const std::string& dir) {
    ffi::Module lib = ffi::Module::LoadFromFile(dir + "/lib.so");
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2 /* pooled allocator */);
    return vm;
  }

  // One call: ids at positions pos.., returns the argmax token of row `row`; replaces the cache.
  int64_t Step(const Graph& g, const std::vector<int64_t>& ids, int64_t pos, const Tensor& nbits,
               std::vector<Tensor>* cache, int64_t row) {
    Tensor input = Int64Tensor(ids), p = Scalar1(pos, DLDataType{kDLInt, 64, 1});
    std::vector<ffi::AnyView> args;
    args.push_back(input);
    args.push_back(p);
    for (const Tensor& c : *cache) args.push_back(c);
    args.push_back(nbits);
    for (const Tensor& w : g.params) args.push_back(w);
    ffi::Any ret;
    g.fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &ret);
    auto outs = ret.cast<ffi::Array<ffi::Any>>();
    ffi::Tensor logits = outs[0].cast<ffi::Tensor>();   // [1, S, V] float32
    for (size_t i = 0; i < cache->size(); ++i) (*cache)[i] = outs[i + 1].cast<Tensor>();
    int64_t vocab = logits.size(2);
    const float* row_ptr = static_cast<const float*>(logits.data_ptr()) + row * vocab;
    int64_t best = 0;
    for (int64_t v = 1; v < vocab; ++v)
      if (row_ptr[v] > row_ptr[best]) best = v;
    return best;
  }

  ffi::json::Object manifest_;
  ffi::Module vm_;
  std::vector<int64_t> bit_widths_;
  std::map<std::string, Tensor> weights_;
  std::map<std::string, Graph> graphs_;
  int64_t n_layers_ = 0, n_kv_heads_ = 0, max_len_ = 0, head_dim_ = 0;
};

std::vector<int64_t> ParseList(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    size_t used = 0;
    int64_t v = std::stoll(item, &used);
    if (used != item.size()) throw std::invalid_argument("not an integer: " + item);
    out.push_back(v);
  }
  return out;
}

int Usage() {
  std::cerr << "usage: anyprec_generate ARTIFACT_DIR --prompt-ids 1,2,3 [--bits 3,8] [--max-new-tokens 16] "
               "[--prompt-fn prefill|decode]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  std::string dir = argv[1];
  std::vector<int64_t> prompt, bits;
  int max_new = 16;
  std::string prompt_fn = "prefill";
  try {
    for (int i = 2; i < argc; ++i) {
      std::string a = argv[i];
      if (i + 1 >= argc) return Usage();
      if (a == "--prompt-ids") prompt = ParseList(argv[++i]);
      else if (a == "--bits") bits = ParseList(argv[++i]);
      else if (a == "--max-new-tokens") max_new = std::stoi(argv[++i]);
      else if (a == "--prompt-fn") prompt_fn = argv[++i];
      else return Usage();
    }
  } catch (const std::exception& e) {
    std::cerr << "anyprec_generate: bad argument: " << e.what() << "\n";
    return 2;
  }
  if (prompt.empty()) {
    std::cerr << "anyprec_generate: the prompt is empty: give --prompt-ids\n";
    return 2;
  }
  try {
    auto t0 = std::chrono::steady_clock::now();
    Model model(dir);
    auto t1 = std::chrono::steady_clock::now();
    std::cerr << "loaded " << dir << " in " << std::chrono::duration<double>(t1 - t0).count() << " s\n";
    if (bits.empty()) bits = {model.bit_widths().back()};
    for (int64_t b : bits) {
      auto s = std::chrono::steady_clock::now();
      std::vector<int64_t> out = model.Generate(prompt, static_cast<int>(b), max_new, prompt_fn);
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
      std::cout << "bits=" << b << " ids=";
      for (size_t i = 0; i < out.size(); ++i) std::cout << (i ? " " : "") << out[i];
      std::cout << std::endl;
      std::cerr << b << "-bit: " << out.size() << " tokens in " << dt << " s\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "anyprec_generate: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
