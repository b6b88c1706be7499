using System.Text.Json;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.StableDiffusion;

/// <summary>Every <c>forward</c> case of the sd and sdxl manifests, against the diffusers folder and the single file.</summary>
public class ForwardReferenceTests
{
    public static TheoryData<string, string, string> Cases()
    {
        var data = new TheoryData<string, string, string>();
        foreach (var set in SdReference.Sets)
            foreach (var c in SdReference.Manifest(set).GetProperty("forward").EnumerateArray())
                foreach (var layout in SdReference.Layouts(set))
                    data.Add(set, c.GetProperty("name").GetString()!, layout);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Forward_case_reproduces_reference_outputs(string set, string caseName, string layout)
    {
        var c = SdReference.ForwardCase(set, caseName);
        var model = SdReference.Model(set, layout);
        var tol = SdReference.Tolerance(set, c.GetProperty("tolerance").GetString()!);
        using var file = SafetensorsFile.Open(SdReference.PathOf(set, c.GetProperty("file").GetString()!));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        Tensor Input(string name) => file.Load(c.GetProperty("inputs").GetProperty(name).GetString()!);

        var actual = c.GetProperty("component").GetString() switch
        {
            "te" => TextEncoderOutputs(model, Input, c),
            "unet" => UNetOutputs(model, Input, c),
            "vae" => VaeOutputs(model, Input, c),
            var other => throw new InvalidOperationException($"unknown component {other}"),
        };

        int compared = 0;
        foreach (var output in c.GetProperty("outputs").EnumerateObject())
        {
            Assert.True(actual.ContainsKey(output.Name), $"{set}/{caseName}: output '{output.Name}' is not computed by the test");
            SdReference.AssertClose(file.Load(output.Value.GetString()!), actual[output.Name], tol, $"{set}/{caseName}/{layout}/{output.Name}");
            compared++;
        }
        Assert.True(compared > 0);
    }

    /// <summary>The pipeline-facing EncodeText gives what each family's pipeline feeds the UNet.</summary>
    [Theory]
    [InlineData("sd")]
    [InlineData("sdxl")]
    public void EncodeText_returns_the_family_conditioning(string set)
    {
        var model = SdReference.Model(set, "single_file");
        var tol = SdReference.Tolerance(set, "te");
        using var file = SafetensorsFile.Open(SdReference.PathOf(set, "forward/te_ref.safetensors"));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        if (set == "sd")
        {
            using var c1 = model.EncodeText(file.Load("input_ids"));
            SdReference.AssertClose(file.Load("te_last_hidden_state"), c1.Context, tol, "clip skip 1");
            Assert.Null(c1.PooledTextEmbeds);
            using var c2 = model.EncodeText(file.Load("input_ids"), clipSkip: 2);
            SdReference.AssertClose(file.Load("te_penultimate_final_layer_norm"), c2.Context, tol, "clip skip 2");
            int layers = model.TextEncoder!.Config.NumHiddenLayers;
            Assert.Throws<ArgumentOutOfRangeException>(() => model.EncodeText(file.Load("input_ids"), clipSkip: layers + 1));
        }
        else
        {
            using var c = model.EncodeText(file.Load("input_ids"), file.Load("input_ids_2"));
            SdReference.AssertClose(file.Load("context"), c.Context, tol, "context");
            SdReference.AssertClose(file.Load("te2_text_embeds"), c.PooledTextEmbeds!, tol, "pooled");
            using var unetFile = SafetensorsFile.Open(SdReference.PathOf(set, "forward/unet_ref.safetensors"));
            var row = unetFile.Load("unet_time_ids")[0].data<float>().ToArray().Select(v => (int)v).ToArray();
            var ids = model.TimeIds(2, (row[0], row[1]), (row[2], row[3]), (row[4], row[5]));
            Assert.Equal(new long[] { 2, 6 }, ids.shape);
            Assert.Equal(unetFile.Load("unet_time_ids")[0].data<float>().ToArray(), ids[1].data<float>().ToArray());
        }
    }

    static Dictionary<string, Tensor> TextEncoderOutputs(StableDiffusionModel model, Func<string, Tensor> input, JsonElement c)
    {
        var r = new Dictionary<string, Tensor>();
        var inputs = c.GetProperty("inputs");
        if (model.TextEncoder2 is null)
        {
            using var o = model.TextEncoder!.call(input("input_ids"));
            var te = model.TextEncoder!;
            r["te_last_hidden_state"] = o.LastHiddenState.alias();
            r["te_penultimate_hidden_state"] = o.HiddenStates[^2].alias();
            r["te_penultimate_final_layer_norm"] = te.FinalLayerNorm.call(o.HiddenStates[^2]);
            r["te_pooler_output"] = o.PooledOutput.alias();
            r["te_all_hidden_states"] = stack(o.HiddenStates, 0);
            // Encode() is the clip-skip shortcut the pipeline uses: it must agree with the full output.
            r["te_penultimate_final_layer_norm_via_encode"] = te.Encode(input("input_ids"), clipSkip: 2);
            Assert.Equal(0, (r["te_penultimate_final_layer_norm_via_encode"] - r["te_penultimate_final_layer_norm"]).abs().max().item<float>());
            return r;
        }
        using var o1 = model.TextEncoder!.call(input("input_ids"));
        using var o2 = model.TextEncoder2.call(input("input_ids_2"));
        r["te1_last_hidden_state"] = o1.LastHiddenState.alias();
        r["te1_penultimate_hidden_state"] = o1.HiddenStates[^2].alias();
        r["te1_pooler_output"] = o1.PooledOutput.alias();
        r["te2_last_hidden_state"] = o2.LastHiddenState.alias();
        r["te2_penultimate_hidden_state"] = o2.HiddenStates[^2].alias();
        r["te2_pooler_output"] = o2.PooledOutput.alias();
        r["te2_text_embeds"] = o2.TextEmbeds!.alias();
        r["context"] = cat([o1.HiddenStates[^2], o2.HiddenStates[^2]], -1);
        Assert.True(inputs.TryGetProperty("input_ids_2", out _));
        return r;
    }

    static Dictionary<string, Tensor> UNetOutputs(StableDiffusionModel model, Func<string, Tensor> input, JsonElement c)
    {
        var inputs = c.GetProperty("inputs");
        Tensor? Optional(string name) => inputs.TryGetProperty(name, out _) ? input(name) : null;
        var output = model.Unet.Predict(input("sample"), input("timestep"), input("encoder_hidden_states"), Optional("text_embeds"), Optional("time_ids"));
        var name = c.GetProperty("outputs").EnumerateObject().Single().Name;
        return new() { [name] = output };
    }

    static Dictionary<string, Tensor> VaeOutputs(StableDiffusionModel model, Func<string, Tensor> input, JsonElement c)
    {
        var vae = model.Vae!;
        var inputs = c.GetProperty("inputs");
        var r = new Dictionary<string, Tensor>();
        if (inputs.TryGetProperty("image", out _))
        {
            using var dist = vae.Encode(input("image"));
            r["mean"] = dist.Mean.alias();
            r["logvar"] = dist.LogVar.alias();
            r["std"] = dist.Std.alias();
        }
        if (inputs.TryGetProperty("latents", out _))
        {
            var z = input("latents");
            r["image"] = vae.Decode(z);
            r["image_scaled"] = vae.Decode(z / vae.Config.ScalingFactor);
        }
        return r;
    }
}
