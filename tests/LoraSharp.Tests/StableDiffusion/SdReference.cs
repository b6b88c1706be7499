using System.Collections.Concurrent;
using System.Text.Json;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.StableDiffusion;

/// <summary>The reference sets <c>sd</c> and <c>sdxl</c>: manifests, tolerances, and their tiny models loaded once per process.</summary>
static class SdReference
{
    public static readonly string[] Sets = ["sd", "sdxl"];

    static readonly ConcurrentDictionary<string, JsonDocument> Manifests = new();
    static readonly ConcurrentDictionary<string, Lazy<StableDiffusionModel>> Models = new();

    public static JsonElement Manifest(string set) =>
        Manifests.GetOrAdd(set, s => JsonDocument.Parse(ReferenceData.ReadJson(s, "manifest.json").ToJsonString())).RootElement;

    public static string PathOf(string set, string relative) => ReferenceData.PathOf(set, relative);

    public static string DiffusersDir(string set) => PathOf(set, Manifest(set).GetProperty("model").GetProperty("diffusers_dir").GetString()!);

    public static string SingleFile(string set) => PathOf(set, Manifest(set).GetProperty("model").GetProperty("single_file_safetensors").GetString()!);

    public static (double Atol, double Rtol) Tolerance(string set, string name)
    {
        var t = Manifest(set).GetProperty("tolerances").GetProperty(name);
        return (t.GetProperty("atol").GetDouble(), t.GetProperty("rtol").GetDouble());
    }

    public static JsonElement ForwardCase(string set, string name) =>
        Manifest(set).GetProperty("forward").EnumerateArray().First(c => c.GetProperty("name").GetString() == name);

    /// <summary>
    /// Layouts every forward case runs against: the diffusers folder; the single file with the folder's configs (as the
    /// README says); the single file with configs derived from its shapes, given only what shapes cannot tell (heads,
    /// group count) from the manifest; and the .ckpt copy when the set has one.
    /// </summary>
    public static IEnumerable<string> Layouts(string set)
    {
        yield return "diffusers";
        yield return "single_file";
        yield return "single_file_derived";
        if (Manifest(set).GetProperty("model").TryGetProperty("ckpt", out _)) yield return "ckpt";
    }

    public static StableDiffusionModel Model(string set, string layout) =>
        Models.GetOrAdd(set + "/" + layout, _ => new Lazy<StableDiffusionModel>(() => layout switch
        {
            "diffusers" => StableDiffusionModel.FromDiffusers(DiffusersDir(set)),
            "single_file" => StableDiffusionCheckpoint.Load(SingleFile(set), new StableDiffusionLoadOptions { Config = StableDiffusionConfig.FromDiffusersFolder(DiffusersDir(set)) }),
            "single_file_derived" => StableDiffusionCheckpoint.Load(SingleFile(set), new StableDiffusionLoadOptions { Config = DerivedConfig(set, SingleFile(set)) }),
            "ckpt" => StableDiffusionCheckpoint.Load(Ckpt(set), new StableDiffusionLoadOptions { Config = DerivedConfig(set, Ckpt(set)) }),
            _ => throw new ArgumentException(layout),
        })).Value;

    public static string Ckpt(string set) => PathOf(set, Manifest(set).GetProperty("model").GetProperty("ckpt").GetString()!);

    /// <summary>The config derived from the file's shapes, with heads and group counts from the manifest's config.</summary>
    public static StableDiffusionConfig DerivedConfig(string set, string file)
    {
        using var source = StableDiffusionCheckpoint.Open(file);
        var derived = StableDiffusionCheckpoint.DeriveConfig(source);
        var m = Manifest(set).GetProperty("model").GetProperty("config");
        var u = m.GetProperty("unet");
        var heads = u.GetProperty("attention_head_dim");
        int[] unetHeads = heads.ValueKind == JsonValueKind.Array
            ? heads.EnumerateArray().Select(e => e.GetInt32()).ToArray()
            : Enumerable.Repeat(heads.GetInt32(), derived.Unet.BlockOutChannels.Length).ToArray();
        return derived with
        {
            Unet = derived.Unet with { AttentionHeads = unetHeads, NormNumGroups = u.GetProperty("norm_num_groups").GetInt32() },
            Vae = derived.Vae! with { NormNumGroups = m.GetProperty("vae").GetProperty("norm_num_groups").GetInt32() },
            TextEncoder = derived.TextEncoder is null ? null : derived.TextEncoder with { NumAttentionHeads = m.GetProperty("text_encoder").GetProperty("num_attention_heads").GetInt32() },
            TextEncoder2 = derived.TextEncoder2 is null ? null : derived.TextEncoder2 with { NumAttentionHeads = m.GetProperty("text_encoder_2").GetProperty("num_attention_heads").GetInt32() },
        };
    }

    /// <summary>Asserts |actual − expected| ≤ atol + rtol·|expected| elementwise, reporting the worst element.</summary>
    public static void AssertClose(Tensor expected, Tensor actual, (double Atol, double Rtol) tol, string what)
    {
        using var scope = NewDisposeScope();
        Assert.True(expected.shape.SequenceEqual(actual.shape),
            $"{what}: shape [{string.Join(",", actual.shape)}], expected [{string.Join(",", expected.shape)}]");
        var e = expected.to_type(ScalarType.Float32);
        var a = actual.to_type(ScalarType.Float32);
        var diff = (a - e).abs();
        var excess = diff - (tol.Atol + tol.Rtol * e.abs());
        double worst = excess.max().item<float>();
        double maxDiff = diff.max().item<float>();
        Assert.False(a.isnan().any().item<bool>(), $"{what}: NaN in output");
        Assert.True(worst <= 0, $"{what}: max |diff| {maxDiff:G4} exceeds atol {tol.Atol} + rtol {tol.Rtol}·|expected|");
    }
}
