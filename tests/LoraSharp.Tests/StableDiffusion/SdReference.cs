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

    /// <summary>Layouts every forward case runs against: the diffusers folder and the single file (with the folder's configs, as the README says).</summary>
    public static readonly string[] Layouts = ["diffusers", "single_file"];

    public static StableDiffusionModel Model(string set, string layout) =>
        Models.GetOrAdd(set + "/" + layout, _ => new Lazy<StableDiffusionModel>(() => layout switch
        {
            "diffusers" => StableDiffusionModel.FromDiffusers(DiffusersDir(set)),
            "single_file" => StableDiffusionCheckpoint.Load(SingleFile(set), new StableDiffusionLoadOptions { Config = StableDiffusionConfig.FromDiffusersFolder(DiffusersDir(set)) }),
            _ => throw new ArgumentException(layout),
        })).Value;

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
