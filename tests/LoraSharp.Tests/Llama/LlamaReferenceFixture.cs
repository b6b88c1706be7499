using System.Text.Json;
using LoraSharp.Models.Llama;
using LoraSharp.Tests.Infrastructure;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Llama;

/// <summary>The reference tiny Llama (shared/reference/llm), loaded once per test class.</summary>
public sealed class LlamaReferenceFixture : IDisposable
{
    public static string LlmRoot => ReferenceData.PathOf("llm");

    public static JsonElement Manifest { get; } = JsonDocument.Parse(File.ReadAllText(Path.Combine(LlmRoot, "manifest.json"))).RootElement;

    public static string FromManifest(string field) => Path.Combine(LlmRoot, Manifest.GetProperty(field).GetString()!);

    public LlamaForCausalLM Model { get; } = LlamaCheckpoint.Load(FromManifest("model_dir"));

    /// <summary>input_ids [2, 8] of vectors/inputs.json.</summary>
    public static long[][] InputIds()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(FromManifest("inputs")));
        return doc.RootElement.GetProperty("input_ids").EnumerateArray()
            .Select(row => row.EnumerateArray().Select(e => e.GetInt64()).ToArray()).ToArray();
    }

    public static Tensor InputTensor()
    {
        var rows = InputIds();
        return tensor(rows.SelectMany(r => r).ToArray(), [rows.Length, rows[0].Length], dtype: ScalarType.Int64);
    }

    public static double Tolerance(string name) => Manifest.GetProperty("tolerances").GetProperty(name).GetDouble();

    public void Dispose() => Model.Dispose();
}
