using LoraSharp.IO;
using LoraSharp.Models.Llama;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Llama;

public class LlamaCheckpointTests
{
    /// <summary>A random tiny model written as an HF folder (config.json + model.safetensors); returns the in-memory model.</summary>
    static LlamaForCausalLM WriteFolder(string folder, string extra = "")
    {
        File.WriteAllText(Path.Combine(folder, "config.json"), LlamaModelTests.TinyJson(extra));
        var model = new LlamaForCausalLM(LlamaConfig.Load(folder), ScalarType.Float32, CPU, WeightInit.Random, 0.2, new Generator(11));
        LlamaCheckpoint.SaveWeights(model, Path.Combine(folder, "model.safetensors"));
        return model;
    }

    static float MaxLogitDiff(LlamaForCausalLM a, LlamaForCausalLM b)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var ids = tensor(new long[] { 1, 5, 9, 33, 70, 2 }).unsqueeze(0);
        return (a.call(ids, null).to_type(ScalarType.Float32) - b.call(ids, null).to_type(ScalarType.Float32)).abs().max().item<float>();
    }

    [Fact]
    public void Saved_folder_loads_back_with_identical_logits()
    {
        using var dir = new TempDir();
        using var original = WriteFolder(dir.Path);
        using var loaded = LlamaCheckpoint.Load(dir.Path, out var report);
        Assert.True(report.IsComplete, report.ToString());
        Assert.Equal(original.named_parameters().Count(), report.Loaded.Count);
        Assert.Equal(0f, MaxLogitDiff(original, loaded));
    }

    public static TheoryData<ScalarType> LoadTypes() => new(ScalarType.BFloat16, ScalarType.Float16);

    [Theory]
    [MemberData(nameof(LoadTypes))]
    public void Float32_checkpoint_loads_as_half_precision(ScalarType dtype)
    {
        using var dir = new TempDir();
        using var original = WriteFolder(dir.Path);
        using var loaded = LlamaCheckpoint.Load(dir.Path, dtype);
        Assert.All(loaded.parameters(), p => Assert.Equal(dtype, p.dtype));
        using var scope = NewDisposeScope();
        var expected = original.Model.Layers[1].Mlp.UpProj.weight!.to_type(dtype);
        Assert.Equal(0f, (expected - loaded.Model.Layers[1].Mlp.UpProj.weight!).abs().max().to_type(ScalarType.Float32).item<float>());
    }

    [Fact]
    public void Sharded_checkpoint_loads_through_its_index()
    {
        using var dir = new TempDir();
        using var original = WriteFolder(dir.Path);
        var single = Path.Combine(dir.Path, "model.safetensors");
        var map = new Dictionary<string, string>();
        using (var source = SafetensorsFile.Open(single))
        {
            var keys = source.Keys.ToList();
            for (int shard = 0; shard < 2; shard++)
            {
                var name = $"model-0000{shard + 1}-of-00002.safetensors";
                var mine = keys.Where((_, i) => i % 2 == shard).ToList();
                mine.ForEach(k => map[k] = name);
                SafetensorsWriter.Write(Path.Combine(dir.Path, name),
                    mine.Select(k => new PendingTensor(k, ScalarType.Float32, source.Info(k).Shape, () => source.Load(k))));
            }
        }
        File.Delete(single);
        File.WriteAllText(Path.Combine(dir.Path, "model.safetensors.index.json"),
            System.Text.Json.JsonSerializer.Serialize(new Dictionary<string, object> { ["metadata"] = new Dictionary<string, object>(), ["weight_map"] = map }));
        Assert.Equal(2, LlamaCheckpoint.WeightFiles(dir.Path).Count);
        using var loaded = LlamaCheckpoint.Load(dir.Path);
        Assert.Equal(0f, MaxLogitDiff(original, loaded));
    }

    [Fact]
    public void Pytorch_model_bin_loads_through_the_pickle_reader()
    {
        using var dir = new TempDir();
        using var original = WriteFolder(dir.Path);
        var single = Path.Combine(dir.Path, "model.safetensors");
        using (var scope = NewDisposeScope())
            TorchCheckpointWriter.Write(Path.Combine(dir.Path, "pytorch_model.bin"),
                original.named_parameters().Select(p => new KeyValuePair<string, Tensor>(p.name, p.parameter.detach())));
        File.Delete(single);
        Assert.EndsWith("pytorch_model.bin", Assert.Single(LlamaCheckpoint.WeightFiles(dir.Path)));
        using var loaded = LlamaCheckpoint.Load(dir.Path, ScalarType.BFloat16);
        using var again = LlamaCheckpoint.Load(dir.Path);
        Assert.Equal(0f, MaxLogitDiff(original, again));
        Assert.Equal(ScalarType.BFloat16, loaded.Model.Norm.weight.dtype);
    }

    [Fact]
    public void Mismatched_checkpoint_is_an_error_listing_missing_unexpected_and_misshaped_keys()
    {
        using var dir = new TempDir();
        using (var model = WriteFolder(dir.Path)) { }
        var file = Path.Combine(dir.Path, "model.safetensors");
        using (var source = SafetensorsFile.Open(file))
        {
            var tensors = source.Keys.Where(k => k != "model.norm.weight")
                .Select(k => new PendingTensor(k, ScalarType.Float32, source.Info(k).Shape, () => source.Load(k)))
                .Append(new PendingTensor("model.extra.weight", ScalarType.Float32, [2], () => zeros(2)))
                .Append(new PendingTensor("model.layers.0.rotary_emb.inv_freq", ScalarType.Float32, [4], () => zeros(4)))
                .Select(p => p.Key == "model.layers.1.mlp.up_proj.weight" ? p with { Shape = [48, 31], Produce = () => zeros(48, 31) } : p)
                .ToList();
            SafetensorsWriter.Write(file + ".tmp", tensors);
        }
        File.Move(file + ".tmp", file, overwrite: true);

        var error = Assert.Throws<LoraSharpException>(() => LlamaCheckpoint.Load(dir.Path));
        Assert.Contains("1 missing: model.norm.weight", error.Message);
        Assert.Contains("1 unexpected: model.extra.weight", error.Message);
        Assert.Contains("model.layers.1.mlp.up_proj.weight (model [48, 32], file [48, 31])", error.Message);
        Assert.DoesNotContain("inv_freq", error.Message);

        using var lenient = LlamaCheckpoint.Load(dir.Path, out var report, strict: false);
        Assert.Equal(["model.norm.weight"], report.Missing);
        Assert.Equal(["model.extra.weight"], report.Unexpected);
        Assert.Single(report.Mismatched);
    }

    [Fact]
    public void Tied_checkpoint_without_lm_head_loads()
    {
        using var dir = new TempDir();
        using var original = WriteFolder(dir.Path, ", \"tie_word_embeddings\": true");
        using (var f = SafetensorsFile.Open(Path.Combine(dir.Path, "model.safetensors")))
            Assert.DoesNotContain("lm_head.weight", f.Keys);
        using var loaded = LlamaCheckpoint.Load(dir.Path, out var report);
        Assert.True(report.IsComplete, report.ToString());
        Assert.Equal(0f, MaxLogitDiff(original, loaded));
    }

    [Fact]
    public void Untied_checkpoint_without_lm_head_is_an_error()
    {
        using var dir = new TempDir();
        using (var m = WriteFolder(dir.Path, ", \"tie_word_embeddings\": true")) { }
        File.WriteAllText(Path.Combine(dir.Path, "config.json"), LlamaModelTests.TinyJson(", \"tie_word_embeddings\": false"));
        var error = Assert.Throws<LoraSharpException>(() => LlamaCheckpoint.Load(dir.Path));
        Assert.Contains("missing: lm_head.weight", error.Message);
    }

    [Fact]
    public void Folder_without_weights_or_config_is_a_clear_error()
    {
        using var dir = new TempDir();
        Assert.Contains("config.json not found", Assert.Throws<LoraSharpException>(() => LlamaCheckpoint.Load(dir.Path)).Message);
        File.WriteAllText(Path.Combine(dir.Path, "config.json"), LlamaModelTests.TinyJson());
        Assert.Contains("no weights found", Assert.Throws<LoraSharpException>(() => LlamaCheckpoint.Load(dir.Path)).Message);
    }

    [Fact]
    public void Config_errors_name_the_key()
    {
        var e = Assert.Throws<LoraSharpException>(() => LlamaConfig.Parse(LlamaModelTests.TinyJson(", \"num_key_value_heads\": 3"), "c.json"));
        Assert.Equal("num_key_value_heads", e.Key);
        e = Assert.Throws<LoraSharpException>(() => LlamaConfig.Parse(LlamaModelTests.TinyJson(", \"hidden_size\": \"big\""), "c.json"));
        Assert.Equal("hidden_size", e.Key);
        e = Assert.Throws<LoraSharpException>(() => LlamaConfig.Parse(LlamaModelTests.TinyJson(", \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 2}"), "c.json"));
        Assert.Equal("rope_scaling.rope_type", e.Key);
        e = Assert.Throws<LoraSharpException>(() => LlamaConfig.Parse(LlamaModelTests.TinyJson(", \"model_type\": \"gpt2\""), "c.json"));
        Assert.Equal("model_type", e.Key);
    }

    [Fact]
    public void Config_reads_hf_fields_and_defaults()
    {
        var c = LlamaConfig.Parse(LlamaModelTests.TinyJson(", \"eos_token_id\": [128001, 128009], \"rope_theta\": 500000.0, \"sliding_window\": null"));
        Assert.Equal([128001, 128009], c.EosTokenIds);
        Assert.Equal(500000.0, c.RopeTheta);
        Assert.Equal(8, c.HeadDim);
        Assert.Null(c.SlidingWindow);
        Assert.False(c.UsesSlidingWindow(0));
        var q = LlamaConfig.Parse(LlamaModelTests.TinyJson(", \"model_type\": \"qwen2\", \"sliding_window\": 4096, \"use_sliding_window\": false"));
        Assert.True(q.AttentionBias);
        Assert.False(q.OutputProjectionBias);
        Assert.Null(q.SlidingWindow);
    }
}
